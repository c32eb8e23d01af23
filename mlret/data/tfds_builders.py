"""TFDS builders (ArrayRecord, no TensorFlow) for mlret's training units and evaluation sets.

- `MlretUnits` ("mlret_units"): parallel units of one source (XQuAD-R, MLQA-R, MLQA, SQuAD translate-train,
  mMARCO, TyDi QA GoldP, MIRACL, Mr. TyDi, user JSONL), one record per unit. Its config carries the reader
  options, so different options prepare into different directories.
- `MlretLareqa` ("mlret_lareqa"): XQuAD-R / MLQA-R for evaluation, as `questions` (each with the key of its
  gold sentence) or `candidates` (every sentence of every paragraph, keyed by language, article, paragraph and
  sentence index: never by text, since a few sentences repeat).
- `MlretTrecTopics` ("mlret_trec_topics"): MIRACL / Mr. TyDi topics with their qrels, one record per topic.

Every builder reads a local directory when its config names one (offline: `../shared/data` or a mirror of the
public layout; files are found by their public names anywhere below it) and downloads the public files
otherwise. Prepare with `download_and_prepare(file_format="array_record")`; read with `tfds.data_source` /
`builder.as_data_source(split)` (random access, what Grain needs). Traps of this TFDS without TensorFlow:
records are stored in key-hash order unless shuffling is disabled (it is here: record i is unit i of the
reader), `Text` features come back as bytes, and ragged nested sequences cannot be encoded, so a unit's
negatives are stored as one JSON list per language.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mlret.data import readers
from mlret.data.sources import KIND_OPTIONS, KINDS
from mlret.data.units import LANG_INDEX, BadRecords, DataError, LangText, ParallelUnit

log = logging.getLogger(__name__)

XQUAD_R_LANGS = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
MLQA_LANGS = ("ar", "de", "en", "es", "hi", "vi", "zh")
MMARCO_LANGS = {"ar": "arabic", "de": "german", "en": "english", "es": "spanish", "fr": "french", "hi": "hindi",
                "id": "indonesian", "it": "italian", "ja": "japanese", "nl": "dutch", "pt": "portuguese",
                "ru": "russian", "vi": "vietnamese", "zh": "chinese"}
MIRACL_LANGS = ("ar", "bn", "de", "en", "es", "fa", "fi", "fr", "hi", "id", "ja", "ko", "ru", "sw", "te", "th",
                "yo", "zh")
MRTYDI_LANGS = {code: name for name, code in readers.TYDI_LANGUAGES.items()}
SQUAD_TRANSLATE_LANGS = ("ar", "de", "el", "es", "hi", "ru", "th", "tr", "vi", "zh")

_LAREQA_URL = "https://raw.githubusercontent.com/google-research-datasets/lareqa/{commit}/{set}/{lang}.json"
# MLQA-R was removed upstream at b91469b; this is the last commit that has it (what ../shared/data mirrors).
_LAREQA_COMMIT = {"xquad-r": "master", "mlqa-r": "354d67d1cd066854cdfbf5ad0e6105528976141d"}
_MLQA_URL = "https://dl.fbaipublicfiles.com/MLQA/MLQA_V1.zip"
_SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/{split}-v1.1.json"
_XTREME_SQUAD_URL = ("https://storage.googleapis.com/xtreme_translations/SQuAD/translate-{split}/"
                     "squad.translate.{split}.en-{lang}.json")
_TYDI_GOLDP_URL = "https://storage.googleapis.com/tydiqa/v1.1/tydiqa-goldp-v1.1-{split}.json"
_MMARCO_URL = "https://huggingface.co/datasets/unicamp-dl/mmarco/resolve/main/data/"
_MIRACL_URL = "https://huggingface.co/datasets/miracl/miracl/resolve/main/miracl-v1.0-{lang}/{kind}/{kind}.miracl-v1.0-{lang}-{split}.tsv"
_MIRACL_CORPUS_TREE = "https://huggingface.co/api/datasets/miracl/miracl-corpus/tree/main/miracl-corpus-v1.0-{lang}"
_MIRACL_CORPUS_FILE = "https://huggingface.co/datasets/miracl/miracl-corpus/resolve/main/{path}"
_MRTYDI_URL = "https://git.uwaterloo.ca/jimmylin/mr.tydi/-/raw/master/data/mrtydi-v1.1-{name}.tar.gz"

# Bump a builder's version when its reader changes what it writes (prepared directories are per version).
_UNITS_VERSION = "1.0.0"
_LAREQA_VERSION = "1.0.0"
_TOPICS_VERSION = "1.0.0"

KIND_LANGS: dict[str, tuple[str, ...]] = {
    "xquad_r": XQUAD_R_LANGS, "mlqa_r": MLQA_LANGS, "mlqa": MLQA_LANGS,
    "squad_translate": ("en",) + SQUAD_TRANSLATE_LANGS, "mmarco": tuple(sorted(MMARCO_LANGS)),
    "tydiqa_goldp": tuple(sorted(MRTYDI_LANGS)), "miracl": MIRACL_LANGS, "mrtydi": tuple(sorted(MRTYDI_LANGS)),
    "jsonl": (),
}

# --------------------------------------------------------------------------------------------- file discovery

def _find(root: Path, name: str) -> Path | None:
    """The file called `name` anywhere below root (shortest path first), or None."""
    direct = root / name
    if direct.is_file():
        return direct
    hits = sorted(root.rglob(name), key=lambda p: (len(p.parts), str(p)))
    return hits[0] if hits else None


def _need(root: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        hit = _find(root, name)
        if hit is not None:
            return hit
    raise DataError(f"{root}: no {what} (looked for {' or '.join(names)} anywhere below it)")


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
    bad_langs = [lang for lang in languages if lang not in LANG_INDEX]
    if bad_langs:
        raise DataError(f"source {kind}: unknown language code(s) {bad_langs} (mlret.data.LANGUAGES)")
    if KIND_LANGS[kind] and (set(languages) - set(KIND_LANGS[kind])):
        raise DataError(f"source {kind}: {sorted(set(languages) - set(KIND_LANGS[kind]))} not in the set "
                        f"({', '.join(KIND_LANGS[kind])})")
    opts = dict(options or {})
    unknown = set(opts) - set(KIND_OPTIONS.get(kind, ()))
    if unknown:
        raise DataError(f"source {kind}: unknown option(s) {sorted(unknown)} (this kind takes "
                        f"{list(KIND_OPTIONS.get(kind, ())) or 'none'})")
    if kind == "jsonl" and not local_dir:
        raise DataError("source jsonl: needs a path (a .jsonl file or a folder of them)")
    local = str(Path(local_dir).resolve()) if local_dir else ""
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
            "negatives": [json.dumps(list(unit.texts[x].negatives), ensure_ascii=False) for x in langs]}


def decode_unit(record: Mapping[str, Any]) -> ParallelUnit:
    """A stored `mlret_units` record (Text comes back as bytes) -> ParallelUnit."""
    def s(x: Any) -> str:
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)
    texts = {s(lang): LangText(query=s(q), positive=s(p), negatives=tuple(json.loads(s(n))))
             for lang, q, p, n in zip(record["lang"], record["query"], record["positive"], record["negatives"])}
    return ParallelUnit(id=s(record["id"]), source=s(record["source"]), texts=texts)


class MlretUnits(tfds.core.GeneratorBasedBuilder):
    """Parallel units of one source; build its config with `units_config(...)`."""

    code_path = _CODE_PATH
    VERSION = tfds.core.Version(_UNITS_VERSION)
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [units_config(kind) for kind in KINDS if kind != "jsonl"]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Parallel units (DESIGN.md §2): a query, its positive passage and hard negatives per "
                        "language; negatives are a JSON list per language.",
            features=tfds.features.FeaturesDict({
                "id": text, "source": text, "lang": tfds.features.Sequence(text),
                "query": tfds.features.Sequence(text), "positive": tfds.features.Sequence(text),
                "negatives": tfds.features.Sequence(text)}),
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


def _langs(cfg: UnitsConfig) -> tuple[str, ...]:
    return cfg.languages or KIND_LANGS[cfg.kind]


def read_source_units(cfg: UnitsConfig, dl_manager: tfds.download.DownloadManager | None = None) -> list[
        ParallelUnit]:
    """Read the units a UnitsConfig describes, from its local_dir or (with a download manager) the public
    files. The builder calls this; tests and the schedule preview can call it directly."""
    opts = dict(cfg.options)
    bad = BadRecords(cfg.on_bad_record)
    local = Path(cfg.local_dir) if cfg.local_dir else None
    if local is not None and not local.exists():
        raise DataError(f"{local}: no such file or directory (source {cfg.kind}, config.data.sources[*].path)")
    if local is None and dl_manager is None:
        raise DataError(f"source {cfg.kind}: no local path and no download manager")
    langs = _langs(cfg)
    kind = cfg.kind

    def fetch(urls: Mapping[str, str]) -> dict[str, Path]:
        return {k: Path(v) for k, v in dl_manager.download(dict(urls)).items()}

    if kind in ("xquad_r", "mlqa_r"):
        sub = kind.replace("_", "-")
        if local is not None:
            files = {lang: _need(local, [f"{lang}.json"], f"{sub} {lang} file") for lang in langs}
        else:
            files = fetch({lang: _LAREQA_URL.format(commit=_LAREQA_COMMIT[sub], set=sub, lang=lang)
                           for lang in langs})
        return readers.read_squad_sentences(files, source=kind, paragraph_context=cfg.paragraph_context,
                                            max_negatives=cfg.max_negatives, on_bad=bad)
    if kind == "mlqa":
        root = local if local is not None else Path(dl_manager.download_and_extract(_MLQA_URL))
        files = {lang: _need(root, [f"{cfg.split}-context-{lang}-question-{lang}.json"], f"MLQA {lang} file")
                 for lang in langs}
        return readers.read_squad_translated(files, source=kind, passage=opts.get("passage", "context"),
                                             max_negatives=cfg.max_negatives, on_bad=bad)
    if kind == "squad_translate":
        names = {lang: (f"{cfg.split}-v1.1.json" if lang == "en" else
                        f"squad.translate.{cfg.split}.en-{lang}.json") for lang in langs}
        if local is not None:
            files = {lang: _need(local, [name], f"SQuAD {lang} file") for lang, name in names.items()}
        else:
            files = fetch({lang: _SQUAD_URL.format(split=cfg.split) if lang == "en" else
                           _XTREME_SQUAD_URL.format(split=cfg.split, lang=lang) for lang in langs})
        return readers.read_squad_translated(files, source=kind, passage=opts.get("passage", "context"),
                                             id_pattern=opts.get("id_pattern"), max_negatives=cfg.max_negatives,
                                             on_bad=bad)
    if kind == "tydiqa_goldp":
        name = f"tydiqa-goldp-v1.1-{cfg.split}.json"
        path = _need(local, [name], "TyDi QA GoldP file") if local is not None else fetch(
            {"f": _TYDI_GOLDP_URL.format(split=cfg.split)})["f"]
        return readers.read_tydiqa_goldp(path, source=kind, languages=cfg.languages or None, on_bad=bad)
    if kind == "mmarco":
        q_names = {lang: f"{MMARCO_LANGS[lang]}_queries.{cfg.split}.tsv" for lang in langs}
        c_names = {lang: f"{MMARCO_LANGS[lang]}_collection.tsv" for lang in langs}
        t_name = f"triples.{cfg.split}.ids.small.tsv"
        if local is not None:
            queries = {lang: _need(local, [n], f"mMARCO {lang} queries") for lang, n in q_names.items()}
            collection = {lang: _need(local, [n], f"mMARCO {lang} collection") for lang, n in c_names.items()}
            triples = _need(local, [t_name], "mMARCO id triples")
        else:
            queries = fetch({lang: f"{_MMARCO_URL}google/queries/{cfg.split}/{n}" for lang, n in q_names.items()})
            collection = fetch({lang: f"{_MMARCO_URL}google/collections/{n}" for lang, n in c_names.items()})
            triples = fetch({"t": _MMARCO_URL + t_name})["t"]
        max_units = opts.get("max_units")
        return readers.read_mmarco(queries, collection, triples, source=kind,
                                   max_units=int(max_units) if max_units else None,
                                   max_negatives=cfg.max_negatives, on_bad=bad)
    if kind in ("miracl", "mrtydi"):
        units: list[ParallelUnit] = []
        for lang in langs:
            topics, qrels, corpus = _trec_files(kind, lang, cfg.split, local, dl_manager)
            units += readers.read_trec_retrieval(lang, topics, qrels, corpus, source=kind,
                                                 max_negatives=cfg.max_negatives, on_bad=bad)
        return units
    if kind == "jsonl":
        files = [local] if local.is_file() else sorted([*local.rglob("*.jsonl"), *local.rglob("*.jsonl.gz")])
        if not files:
            raise DataError(f"{local}: no *.jsonl or *.jsonl.gz files (source jsonl)")
        units = readers.read_units_jsonl(files, on_bad=bad)
        if cfg.languages:  # keep only the requested languages; a unit left with none is dropped, and counted
            keep = set(cfg.languages)
            kept = [ParallelUnit(u.id, u.source, {k: v for k, v in u.texts.items() if k in keep}) for u in units]
            dropped = sum(1 for u in kept if not u.texts)
            if dropped:
                log.info("jsonl source %s: %d units have none of the languages %s", local, dropped, cfg.languages)
            units = [u for u in kept if u.texts]
        return units
    raise DataError(f"unknown source kind {kind!r}")


def _trec_files(kind: str, lang: str, split: str, local: Path | None,
                dl_manager: tfds.download.DownloadManager | None) -> tuple[Path, Path, list[Path]]:
    """Topics, qrels and corpus files of MIRACL / Mr. TyDi in one language (local layout or download)."""
    if kind == "miracl":
        t_name = f"topics.miracl-v1.0-{lang}-{split}.tsv"
        q_name = f"qrels.miracl-v1.0-{lang}-{split}.tsv"
        if local is not None:
            topics = _need(local, [t_name], f"MIRACL {lang} {split} topics")
            qrels = _need(local, [q_name], f"MIRACL {lang} {split} qrels")
            corpus = sorted(local.rglob(f"miracl-corpus-v1.0-{lang}/docs-*.jsonl*"))
            if not corpus:
                corpus = sorted(local.rglob(f"miracl-corpus-v1.0-{lang}*.jsonl*"))
        else:
            got = dl_manager.download({
                "topics": _MIRACL_URL.format(lang=lang, kind="topics", split=split),
                "qrels": _MIRACL_URL.format(lang=lang, kind="qrels", split=split),
                "tree": _MIRACL_CORPUS_TREE.format(lang=lang)})
            topics, qrels = Path(got["topics"]), Path(got["qrels"])
            listing = json.loads(Path(got["tree"]).read_text())  # the Hub's file listing of the corpus folder
            shards = sorted(e["path"] for e in listing if e.get("path", "").endswith(".jsonl.gz"))
            corpus = [Path(p) for p in dl_manager.download([_MIRACL_CORPUS_FILE.format(path=s) for s in shards])]
        if not corpus:
            raise DataError(f"{local}: no MIRACL {lang} corpus (miracl-corpus-v1.0-{lang}/docs-*.jsonl.gz) below it")
        return topics, qrels, corpus
    name = MRTYDI_LANGS[lang]
    if local is None:
        local = Path(dl_manager.download_and_extract(_MRTYDI_URL.format(name=name)))
    topics = _need(local, [f"topics.mrtydi-v1.1-{lang}.{split}.txt.gz", f"topics.mrtydi-v1.1-{lang}.{split}.txt",
                           f"mrtydi-v1.1-{name}/topic.{split}.tsv"], f"Mr. TyDi {lang} {split} topics")
    qrels = _need(local, [f"qrels.mrtydi-v1.1-{lang}.{split}.txt", f"mrtydi-v1.1-{name}/qrels.{split}.txt"],
                  f"Mr. TyDi {lang} {split} qrels")
    corpus = sorted(local.rglob(f"mrtydi-v1.1-{name}/collection/docs.jsonl*"))
    if not corpus:
        raise DataError(f"{local}: no Mr. TyDi {lang} corpus (mrtydi-v1.1-{name}/collection/docs.jsonl.gz)")
    return topics, qrels, corpus


def prepare_units(cfg: UnitsConfig, tfds_dir: str | os.PathLike[str] | None) -> MlretUnits:
    """Prepare (once; later calls reuse the directory) and return the builder of a source.

    `tfds_dir` None means TFDS's own default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    builder = MlretUnits(config=cfg, data_dir=None if tfds_dir is None else str(tfds_dir))
    if not builder.is_prepared():
        log.info("preparing %s into %s", cfg.name, builder.data_dir)
        builder.download_and_prepare(file_format="array_record")
    return builder


# --------------------------------------------------------------------------------------- evaluation: LAReQA

@dataclasses.dataclass(eq=False)
class LareqaConfig(tfds.core.BuilderConfig):
    dataset: str = "xquad_r"  # xquad_r | mlqa_r
    part: str = "questions"  # questions | candidates
    local_dir: str = ""
    languages: tuple[str, ...] = ()


def lareqa_config(dataset: str, part: str, *, local_dir: str | os.PathLike[str] = "",
                  languages: Sequence[str] = ()) -> LareqaConfig:
    if dataset not in ("xquad_r", "mlqa_r") or part not in ("questions", "candidates"):
        raise DataError(f"LAReQA: dataset {dataset!r} / part {part!r}: use xquad_r|mlqa_r and questions|candidates")
    local = str(Path(local_dir).resolve()) if local_dir else ""
    digest = hashlib.sha1(json.dumps([local, sorted(languages)]).encode()).hexdigest()[:10]
    return LareqaConfig(name=f"{dataset}-{part}-{digest}", version=_LAREQA_VERSION, dataset=dataset, part=part,
                        local_dir=local, languages=tuple(sorted(languages)))


class MlretLareqa(tfds.core.GeneratorBasedBuilder):
    """XQuAD-R / MLQA-R evaluation data: `questions` or `candidates` (split "test")."""

    code_path = _CODE_PATH
    VERSION = tfds.core.Version(_LAREQA_VERSION)
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [lareqa_config(d, p) for d in ("xquad_r", "mlqa_r") for p in ("questions", "candidates")]

    def _info(self) -> tfds.core.DatasetInfo:
        text, i32 = tfds.features.Text(), np.int32
        key = {"lang": text, "article": i32, "paragraph": i32, "sentence": i32}
        if self.builder_config.part == "questions":
            # (lang, article, paragraph, sentence) is the key of the gold candidate in the question's
            # language.
            features = {"id": text, "question": text, **key}
        else:
            features = {"text": text, "context": text, **key}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True,
                                     description="LAReQA (arXiv 2004.05484) retrieval view of XQuAD / MLQA.",
                                     homepage="https://github.com/google-research-datasets/lareqa")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        cfg = self.builder_config
        sub = cfg.dataset.replace("_", "-")
        langs = cfg.languages or KIND_LANGS[cfg.dataset]
        if cfg.local_dir:
            files = {lang: _need(Path(cfg.local_dir), [f"{lang}.json"], f"{sub} {lang} file") for lang in langs}
        else:
            files = {k: Path(v) for k, v in dl_manager.download(
                {lang: _LAREQA_URL.format(commit=_LAREQA_COMMIT[sub], set=sub, lang=lang) for lang in langs}).items()}
        return {"test": self._generate_examples(files)}

    def _generate_examples(self, files: Mapping[str, Path]) -> Iterator[tuple[int, dict[str, Any]]]:
        key = 0
        bad = BadRecords("error")
        for lang, path in sorted(files.items()):
            doc = readers.load_json_file(path)
            for a, article in enumerate(doc["data"]):
                for p, para in enumerate(article["paragraphs"]):
                    breaks = para["sentence_breaks"]
                    if self.builder_config.part == "candidates":
                        for s, sentence in enumerate(para["sentences"]):
                            yield key, {"lang": lang, "article": a, "paragraph": p, "sentence": s, "text": sentence,
                                        "context": para["context"]}
                            key += 1
                        continue
                    for q, qa in enumerate(para["qas"]):
                        start = qa["answers"][0]["answer_start"]
                        hits = [s for s, (b0, b1) in enumerate(breaks) if b0 <= start < b1]  # half-open
                        if not hits:
                            bad(f"{path}: data[{a}].paragraphs[{p}].qas[{q}]",
                                f"answer_start {start} lies in no sentence break")
                        yield key, {"id": qa["id"], "question": qa["question"], "lang": lang, "article": a,
                                    "paragraph": p, "sentence": hits[0]}
                        key += 1


# ----------------------------------------------------------------------------- evaluation: MIRACL / Mr. TyDi

@dataclasses.dataclass(eq=False)
class TrecTopicsConfig(tfds.core.BuilderConfig):
    dataset: str = "miracl"  # miracl | mrtydi
    split: str = "dev"
    local_dir: str = ""
    languages: tuple[str, ...] = ()


def trec_topics_config(dataset: str, *, split: str = "dev", local_dir: str | os.PathLike[str] = "",
                       languages: Sequence[str] = ()) -> TrecTopicsConfig:
    if dataset not in ("miracl", "mrtydi"):
        raise DataError(f"TREC topics: dataset {dataset!r} is not miracl or mrtydi")
    local = str(Path(local_dir).resolve()) if local_dir else ""
    digest = hashlib.sha1(json.dumps([local, sorted(languages)]).encode()).hexdigest()[:10]
    return TrecTopicsConfig(name=f"{dataset}-{split}-{digest}", version=_TOPICS_VERSION, dataset=dataset,
                            split=split, local_dir=local, languages=tuple(sorted(languages)))


class MlretTrecTopics(tfds.core.GeneratorBasedBuilder):
    """MIRACL / Mr. TyDi topics with qrels, one record per topic (the corpus is read by the evaluator)."""

    code_path = _CODE_PATH
    VERSION = tfds.core.Version(_TOPICS_VERSION)
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [trec_topics_config("miracl"), trec_topics_config("mrtydi")]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
            "qid": text, "lang": text, "query": text, "docids": tfds.features.Sequence(text),
            "relevance": tfds.features.Sequence(np.int32)}),
            description="TREC topics and qrels of MIRACL / Mr. TyDi.")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        cfg = self.builder_config
        langs = cfg.languages or KIND_LANGS[cfg.dataset]
        files = {}
        for lang in langs:
            local = Path(cfg.local_dir) if cfg.local_dir else None
            if cfg.dataset == "miracl":
                names = (f"topics.miracl-v1.0-{lang}-{cfg.split}.tsv", f"qrels.miracl-v1.0-{lang}-{cfg.split}.tsv")
                if local is not None:
                    files[lang] = (_need(local, [names[0]], f"MIRACL {lang} topics"),
                                   _need(local, [names[1]], f"MIRACL {lang} qrels"))
                else:
                    got = dl_manager.download({k: _MIRACL_URL.format(lang=lang, kind=k, split=cfg.split)
                                               for k in ("topics", "qrels")})
                    files[lang] = (Path(got["topics"]), Path(got["qrels"]))
            else:
                name = MRTYDI_LANGS[lang]
                if local is None:
                    local = Path(dl_manager.download_and_extract(_MRTYDI_URL.format(name=name)))
                files[lang] = (
                    _need(local, [f"topics.mrtydi-v1.1-{lang}.{cfg.split}.txt.gz",
                                  f"topics.mrtydi-v1.1-{lang}.{cfg.split}.txt",
                                  f"mrtydi-v1.1-{name}/topic.{cfg.split}.tsv"], f"Mr. TyDi {lang} topics"),
                    _need(local, [f"qrels.mrtydi-v1.1-{lang}.{cfg.split}.txt",
                                  f"mrtydi-v1.1-{name}/qrels.{cfg.split}.txt"], f"Mr. TyDi {lang} qrels"))
        return {cfg.split: self._generate_examples(files)}

    def _generate_examples(self, files: Mapping[str, tuple[Path, Path]]) -> Iterator[tuple[int, dict[str, Any]]]:
        key = 0
        bad = BadRecords("error")
        for lang, (topics, qrels) in sorted(files.items()):
            q_text = readers._read_id_text(topics, None, bad)
            judged: dict[str, list[tuple[str, int]]] = {}
            for lineno, (qid, _, docid, rel) in readers._tsv_rows(qrels, 4, bad, sep=None):
                if qid not in q_text:
                    bad(f"{qrels}:{lineno}", f"query {qid} is not in {topics}")
                try:
                    judged.setdefault(qid, []).append((docid, int(rel)))
                except ValueError:
                    bad(f"{qrels}:{lineno}", f"relevance {rel!r} is not an integer")
            for qid in sorted(judged):
                yield key, {"qid": qid, "lang": lang, "query": q_text[qid][0],
                            "docids": [d for d, _ in judged[qid]], "relevance": [r for _, r in judged[qid]]}
                key += 1
