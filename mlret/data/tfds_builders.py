"""The TFDS builder (ArrayRecord, no TensorFlow) of mlret's training units.

`MlretUnits` ("mlret_units"): parallel units of one source of any registered kind (`mlret.data.kinds`: XQuAD-R,
MLQA-R, MLQA, SQuAD translate-train, mMARCO, TyDi QA GoldP, MIRACL, Mr. TyDi, user JSONL), one record per unit.
Its config carries the reader options, so different options prepare into different directories. It reads a
local directory when its config names one (offline: `../shared/data` or a mirror of the public layout; files
are found by their public names anywhere below it) and downloads the public files otherwise. Prepare with
`download_and_prepare(file_format="array_record")`; read with `tfds.data_source` / `builder.as_data_source(split)`
(random access, what Grain needs). Traps of this TFDS without TensorFlow: records are stored in key-hash order
unless shuffling is disabled (it is here: record i is unit i of the reader), `Text` features come back as bytes,
and ragged nested sequences cannot be encoded, so a unit's negatives are stored as one JSON list per language.
The evaluators read their sets directly (`mlret.eval`): they need no prepared copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import tqdm_utils

from mlret import storage
from mlret.data.kinds import KINDS, Downloads, LocalFiles, ReadRequest
from mlret.data.units import LANG_INDEX, BadRecords, LangText, ParallelUnit
from mlret.errors import DataError

log = logging.getLogger(__name__)

# Bump the version when a reader changes what it writes (prepared directories are per version).
_UNITS_VERSION = "1.1.0"


# TFDS derives a builder's code path through `importlib_resources`, a package this stack does not install
# (ModuleNotFoundError at download_and_prepare); our builders name their file directly.
_CODE_PATH = epath.Path(__file__)


# ------------------------------------------------------------------------------------------- training units

@dataclasses.dataclass(eq=False)
class UnitsConfig(tfds.core.BuilderConfig):
    """One source of parallel units with its reader options (all of which change the prepared data)."""

    kind: str = "mlqa_r"
    local_dir: str = ""  # "" -> download the public files
    split: str = "train"  # the upstream split to read (its TFDS split has the same name)
    languages: tuple[str, ...] = ()  # () -> every language of the set
    paragraph_context: bool = False
    max_negatives: int = 16
    on_bad_record: str = "error"
    options: tuple[tuple[str, Any], ...] = ()


def units_config(kind: str, *, local_dir: str | os.PathLike[str] = "", split: str = "train",
                 languages: Sequence[str] = (), paragraph_context: bool = False, max_negatives: int = 16,
                 on_bad_record: str = "error", options: Mapping[str, Any] | None = None) -> UnitsConfig:
    """A UnitsConfig whose name fingerprints every option (and the local directory), so that prepared
    datasets with different options never share a directory."""
    if kind not in KINDS:
        raise DataError(f"unknown source kind {kind!r}; one of {', '.join(KINDS)}")
    record = KINDS[kind]
    bad_langs = [lang for lang in languages if lang not in LANG_INDEX]
    if bad_langs:
        raise DataError(f"source {kind}: unknown language code(s) {bad_langs} (mlret.data.LANGUAGES)")
    if record.languages and (set(languages) - set(record.languages)):
        raise DataError(f"source {kind}: {sorted(set(languages) - set(record.languages))} not in the set "
                        f"({', '.join(record.languages)})")
    opts = dict(options or {})
    unknown = set(opts) - set(record.options)
    if unknown:
        raise DataError(f"source {kind}: unknown option(s) {sorted(unknown)} (this kind takes "
                        f"{list(record.options) or 'none'})")
    if record.needs_path and not local_dir:
        raise DataError(f"source {kind}: needs a path (a .jsonl file or a folder of them)")
    local = str(storage.path(local_dir)) if local_dir else ""
    fields = dict(kind=kind, local_dir=local, split=split, languages=tuple(sorted(languages)),
                  paragraph_context=bool(paragraph_context), max_negatives=int(max_negatives),
                  on_bad_record=on_bad_record, options=tuple(sorted(opts.items())))
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return UnitsConfig(name=f"{kind}-{split}-{digest}", version=_UNITS_VERSION,
                       description=json.dumps(fields, default=str), **fields)


def _encode_unit(unit: ParallelUnit) -> dict[str, Any]:
    langs = sorted(unit.texts)
    return {"id": unit.id, "source": unit.source, "lang": langs,
            "query": [unit.texts[x].query for x in langs], "positive": [unit.texts[x].positive for x in langs],
            "negatives": [json.dumps(list(unit.texts[x].negatives), ensure_ascii=False) for x in langs],
            "scores": [json.dumps(list(unit.texts[x].scores)) for x in langs]}


def decode_unit(record: Mapping[str, Any]) -> ParallelUnit:
    """A stored `mlret_units` record (Text comes back as bytes) -> ParallelUnit."""
    def s(x: Any) -> str:
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)
    texts = {s(lang): LangText(query=s(q), positive=s(p), negatives=tuple(json.loads(s(n))),
                               scores=tuple(json.loads(s(t))))
             for lang, q, p, n, t in zip(record["lang"], record["query"], record["positive"], record["negatives"],
                                         record["scores"])}
    return ParallelUnit(id=s(record["id"]), source=s(record["source"]), texts=texts)


class MlretUnits(tfds.core.GeneratorBasedBuilder):
    """Parallel units of one source; build its config with `units_config(...)`."""

    code_path = _CODE_PATH
    VERSION = tfds.core.Version(_UNITS_VERSION)
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "A teacher's scores of the positive and negatives (`scores`, a JSON list per language)."}
    BUILDER_CONFIGS = [units_config(name) for name, kind in KINDS.items() if not kind.needs_path]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Parallel units (docs/architecture.md, Data): a query, its positive passage and hard "
                        "negatives per language; negatives (and a teacher's scores of the positive and negatives, "
                        "[] when none) are a JSON list per language.",
            features=tfds.features.FeaturesDict({
                "id": text, "source": text, "lang": tfds.features.Sequence(text),
                "query": tfds.features.Sequence(text), "positive": tfds.features.Sequence(text),
                "negatives": tfds.features.Sequence(text), "scores": tfds.features.Sequence(text)}),
            # Record i is unit i of the reader (deterministic order, identical on every host).
            disable_shuffling=True,
            homepage="https://github.com/google-research-datasets/lareqa")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        cfg = self.builder_config
        units = read_source_units(cfg, dl_manager)
        if not units:
            raise DataError(f"source {cfg.kind} ({cfg.local_dir or 'download'}, split {cfg.split}): no units")
        return {cfg.split: self._generate_examples(units)}

    def _generate_examples(self, units: Sequence[ParallelUnit]) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, unit in enumerate(units):
            yield i, _encode_unit(unit)


def read_source_units(cfg: UnitsConfig, dl_manager: tfds.download.DownloadManager | None = None) -> list[
        ParallelUnit]:
    """Read the units a UnitsConfig describes, from its local_dir or (with a download manager) the public
    files, through its kind's reader (`mlret.data.kinds`). The builder calls this; tests and the schedule
    preview can call it directly."""
    kind = KINDS[cfg.kind]
    local = storage.path(cfg.local_dir) if cfg.local_dir else None
    if local is not None and not local.exists():
        raise DataError(f"{local}: no such file or directory (source {cfg.kind}, config.data.sources[*].path)")
    if local is None and dl_manager is None:
        raise DataError(f"source {cfg.kind}: no local path and no download manager")
    request = ReadRequest(cfg.kind, cfg.split, cfg.languages or kind.languages, cfg.paragraph_context,
                          cfg.max_negatives, dict(cfg.options), local)
    files = LocalFiles(local) if local is not None else Downloads(dl_manager)
    return kind.read(request, files, BadRecords(cfg.on_bad_record))


def prepare_units(cfg: UnitsConfig, tfds_dir: str | os.PathLike[str] | None) -> MlretUnits:
    """Prepare (once; later calls reuse the directory) and return the builder of a source.

    `tfds_dir` None means TFDS's own default ($TFDS_DATA_DIR or ~/tensorflow_datasets). A gs:// `tfds_dir` holds
    the prepared dataset for every host and run, and each host reads a local copy (`storage.local_mirror`;
    ArrayRecord reads local files only): it is fetched when the bucket has it, else prepared here and uploaded."""
    if tfds_dir is None or not storage.is_gcs(tfds_dir):
        return _prepare_local(cfg, None if tfds_dir is None else str(storage.path(tfds_dir, "config.data.tfds_dir")))
    remote_root = storage.path(tfds_dir, "config.data.tfds_dir")
    local_root = storage.local_mirror(remote_root)
    builder = MlretUnits(config=cfg, data_dir=str(local_root))
    remote = remote_root / epath.Path(builder.data_dir).relative_to(local_root)
    info = remote / "dataset_info.json"
    with storage.bounded("read", info):  # a stalled or failing bucket: one line naming it (exit 75)
        on_bucket = info.exists()
    if not builder.is_prepared() and on_bucket:
        log.info("fetching the prepared %s from %s", cfg.name, remote)
        storage.download_dir(remote)
        return _prepare_local(cfg, str(local_root))
    builder = _prepare_local(cfg, str(local_root))
    with storage.bounded("read", info):  # another host may have uploaded it meanwhile
        on_bucket = info.exists()
    if not on_bucket:
        log.info("uploading the prepared %s to %s", cfg.name, remote)
        storage.sync_dir(epath.Path(builder.data_dir), remote)
    return builder


def _prepare_local(cfg: UnitsConfig, tfds_dir: str | None) -> MlretUnits:
    builder = MlretUnits(config=cfg, data_dir=tfds_dir)
    if not builder.is_prepared():
        log.info("preparing %s into %s", cfg.name, builder.data_dir)
        with _tfds_output_to_log():
            builder.download_and_prepare(file_format="array_record")
    return builder


@contextlib.contextmanager
def _tfds_output_to_log() -> Iterator[None]:
    """TFDS prints to stdout on purpose ("Downloading and preparing dataset Unknown size ...", "Dataset ...
    downloaded and prepared") and draws its own tqdm bars, for a local file read in a second: its lines go to the
    log (INFO) and its bars are off while it prepares."""
    was = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        tfds.display_progress_bar(was)
        for line in printed.getvalue().splitlines():
            if line.strip():
                log.info("tfds: %s", line.strip())
