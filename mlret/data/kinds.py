"""Training-source kinds: one `SourceKind` record per public format, and the registry of them.

A record says everything mlret needs to know of a kind: its languages, its default upstream split, the extra
keys a `config.data.sources` entry of it may carry, the local files the pre-flight looks for, where the public
copy comes from (`origin`), the licence of its data (which the model card states), and its reader. A reader gets
a `ReadRequest` (what to read) and a `Files` (where the files are) and names each file it needs once, with its
public name and its public URL: `LocalFiles` finds the name anywhere below a local folder, `Downloads` fetches the
URL through a TFDS download manager. So the local layout and the download of a kind are one piece of code. A new
kind is a reader here (or in a module of its own) plus one `register(SourceKind(...))` line; `mlret.data.sources`
validates entries against the registry and the TFDS builder `mlret_units` (`mlret.data.tfds_builders`) prepares
any registered kind.

This module imports nothing heavy (no TFDS, no jax).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from mlret import storage
from mlret.data import datasets, readers
from mlret.data.units import BadRecords, ParallelUnit
from mlret.errors import DataError
from mlret.registry import Registry

log = logging.getLogger(__name__)

# (public file names, any of which will do, below a local folder; the public URL; what it is, for errors)
Wanted = tuple[Sequence[str], str, str]


@dataclasses.dataclass(frozen=True)
class ReadRequest:
    """What to read of a source (a `config.data.sources` entry with the data section's reader options)."""

    kind: str
    split: str
    languages: tuple[str, ...]  # resolved: the entry's, else every language of the kind
    paragraph_context: bool = False
    max_negatives: int = 16
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    local: Path | None = None  # the entry's path (file or folder); None: download


class Files(Protocol):
    """Where a reader's files come from."""

    root: Path | None  # the local folder or file, None when downloading

    def get(self, wanted: Mapping[str, Wanted]) -> dict[str, Path]: ...

    def archive(self, url: str) -> Files: ...


def find(root: Path, name: str) -> Path | None:
    """The file called `name` anywhere below root (shortest path first), or None."""
    direct = root / name
    if direct.is_file():
        return direct
    hits = sorted(storage.rglob(root, name), key=lambda p: (len(p.parts), str(p)))
    return hits[0] if hits else None


class LocalFiles:
    """Files found by their public names anywhere below a local folder (a mirror of the public layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def need(self, names: Sequence[str], what: str) -> Path:
        for name in names:
            hit = find(self.root, name)
            if hit is not None:
                return hit
        raise DataError(f"{self.root}: no {what} (looked for {' or '.join(names)} anywhere below it)")

    def get(self, wanted: Mapping[str, Wanted]) -> dict[str, Path]:
        return {key: self.need(names, what) for key, (names, _, what) in wanted.items()}

    def archive(self, url: str) -> LocalFiles:
        return self  # a local mirror holds the archive's files unpacked


class Downloads:
    """Files fetched from their public URLs by a TFDS download manager (cached, checksummed by TFDS)."""

    root = None

    def __init__(self, dl_manager: Any) -> None:
        self.dl_manager = dl_manager

    def get(self, wanted: Mapping[str, Wanted]) -> dict[str, Path]:
        got = self.dl_manager.download({key: url for key, (_, url, _) in wanted.items()})
        return {key: Path(path) for key, path in got.items()}

    def archive(self, url: str) -> LocalFiles:
        return LocalFiles(Path(self.dl_manager.download_and_extract(url)))


Reader = Callable[[ReadRequest, Files, BadRecords], list[ParallelUnit]]


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """One training-source kind (see the module docstring)."""

    name: str
    read: Reader
    origin: str  # what the files are and where their public copy comes from (the pre-flight's message)
    languages: tuple[str, ...] = ()  # () -> any language of mlret.data.LANGUAGES
    split: str = "train"  # the upstream split read when the entry names none
    options: tuple[str, ...] = ()  # extra keys a config.data.sources entry of this kind may carry
    # File names a local folder of this kind must hold somewhere below it, for languages and a split (the
    # pre-flight's list); None: only the path itself is checked.
    local_files: Callable[[Sequence[str], str], list[str]] | None = None
    needs_path: bool = False  # no public download: the entry must name a local path
    # Why the values of an entry's `options` cannot work (None: they can); part of `mlret.config.validate`.
    check: Callable[[Mapping[str, Any]], str | None] = lambda options: None
    # The licence of the kind's data, as the model card of a model trained on it states it. Required: an entry of
    # a kind without one is refused by `mlret.config.validate` (config.data.sources[i].name).
    licence: str = ""
    non_commercial: bool = False  # the data is for non-commercial research only: the card says so up front


KINDS: Registry[SourceKind] = Registry("source kind")
register = KINDS.register


# --------------------------------------------------------------------------------------- XQuAD-R and MLQA-R

_LAREQA_URL = "https://raw.githubusercontent.com/google-research-datasets/lareqa/{commit}/{set}/{lang}.json"
# MLQA-R was removed upstream at b91469b; this is the last commit that has it (what ../shared/data mirrors).
_LAREQA_COMMIT = {"xquad-r": "master", "mlqa-r": "354d67d1cd066854cdfbf5ad0e6105528976141d"}


def _lareqa_names(langs: Sequence[str], split: str) -> list[str]:
    return [f"{lang}.json" for lang in langs]


def _read_lareqa(req: ReadRequest, files: Files, bad: BadRecords) -> list[ParallelUnit]:
    sub = req.kind.replace("_", "-")
    paths = files.get({lang: ([name], _LAREQA_URL.format(commit=_LAREQA_COMMIT[sub], set=sub, lang=lang),
                              f"{sub} {lang} file")
                       for lang, name in zip(req.languages, _lareqa_names(req.languages, req.split))})
    return readers.read_squad_sentences(paths, source=req.kind, paragraph_context=req.paragraph_context,
                                        max_negatives=req.max_negatives, on_bad=bad)


# ------------------------------------------------------------------------------ SQuAD-format translated sets

_MLQA_URL = "https://dl.fbaipublicfiles.com/MLQA/MLQA_V1.zip"
_SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/{split}-v1.1.json"
_XTREME_SQUAD_URL = ("https://storage.googleapis.com/xtreme_translations/SQuAD/translate-{split}/"
                     "squad.translate.{split}.en-{lang}.json")
_TYDI_GOLDP_URL = "https://storage.googleapis.com/tydiqa/v1.1/tydiqa-goldp-v1.1-{split}.json"


def _check_passage(options: Mapping[str, Any]) -> str | None:
    passage = options.get("passage", "context")
    return None if passage in readers.PASSAGES else f"passage: {passage!r} is not one of {', '.join(readers.PASSAGES)}"


def _check_squad_translate(options: Mapping[str, Any]) -> str | None:
    try:
        re.compile(options.get("id_pattern") or "")
    except re.error as e:
        return f"id_pattern: {options['id_pattern']!r} is not a regular expression ({e})"
    return _check_passage(options)


def _read_mlqa(req: ReadRequest, files: Files, bad: BadRecords) -> list[ParallelUnit]:
    root = files.archive(_MLQA_URL)
    paths = root.get({lang: ([f"{req.split}-context-{lang}-question-{lang}.json"], "", f"MLQA {lang} file")
                      for lang in req.languages})
    return readers.read_squad_translated(paths, source=req.kind, passage=req.options.get("passage", "context"),
                                         max_negatives=req.max_negatives, on_bad=bad)


def _read_squad_translate(req: ReadRequest, files: Files, bad: BadRecords) -> list[ParallelUnit]:
    def wanted(lang: str) -> Wanted:
        if lang == "en":
            return [f"{req.split}-v1.1.json"], _SQUAD_URL.format(split=req.split), "SQuAD en file"
        return ([f"squad.translate.{req.split}.en-{lang}.json"], _XTREME_SQUAD_URL.format(split=req.split, lang=lang),
                f"SQuAD {lang} file")

    paths = files.get({lang: wanted(lang) for lang in req.languages})
    return readers.read_squad_translated(paths, source=req.kind, passage=req.options.get("passage", "context"),
                                         id_pattern=req.options.get("id_pattern"), max_negatives=req.max_negatives,
                                         on_bad=bad)


def _read_tydiqa_goldp(req: ReadRequest, files: Files, bad: BadRecords) -> list[ParallelUnit]:
    path = files.get({"f": ([f"tydiqa-goldp-v1.1-{req.split}.json"], _TYDI_GOLDP_URL.format(split=req.split),
                            "TyDi QA GoldP file")})["f"]
    return readers.read_tydiqa_goldp(path, source=req.kind, languages=req.languages, on_bad=bad)


# -------------------------------------------------------------------------------------------------- mMARCO

_MMARCO_URL = "https://huggingface.co/datasets/unicamp-dl/mmarco/resolve/main/data/"


def _check_mmarco(options: Mapping[str, Any]) -> str | None:
    max_units = options.get("max_units", 0)
    try:
        ok = int(max_units) >= 0 and not isinstance(max_units, bool)
    except (TypeError, ValueError):
        ok = False
    return None if ok else f"max_units: {max_units!r} is not a whole number >= 0 (0: every unit)"


def _read_mmarco(req: ReadRequest, files: Files, bad: BadRecords) -> list[ParallelUnit]:
    names = {lang: datasets.MMARCO.names[lang] for lang in req.languages}
    queries = files.get({lang: ([f"{n}_queries.{req.split}.tsv"],
                                f"{_MMARCO_URL}google/queries/{req.split}/{n}_queries.{req.split}.tsv",
                                f"mMARCO {lang} queries") for lang, n in names.items()})
    collection = files.get({lang: ([f"{n}_collection.tsv"], f"{_MMARCO_URL}google/collections/{n}_collection.tsv",
                                   f"mMARCO {lang} collection") for lang, n in names.items()})
    t_name = f"triples.{req.split}.ids.small.tsv"
    triples = files.get({"t": ([t_name], _MMARCO_URL + t_name, "mMARCO id triples")})["t"]
    max_units = req.options.get("max_units")
    return readers.read_mmarco(queries, collection, triples, source=req.kind,
                               max_units=int(max_units) if max_units else None, max_negatives=req.max_negatives,
                               on_bad=bad)


# -------------------------------------------------------------------------------------- MIRACL and Mr. TyDi

_MIRACL_URL = ("https://huggingface.co/datasets/miracl/miracl/resolve/main/miracl-v1.0-{lang}/{kind}/"
               "{kind}.miracl-v1.0-{lang}-{split}.tsv")
_MIRACL_CORPUS_TREE = "https://huggingface.co/api/datasets/miracl/miracl-corpus/tree/main/miracl-corpus-v1.0-{lang}"
_MIRACL_CORPUS_FILE = "https://huggingface.co/datasets/miracl/miracl-corpus/resolve/main/{path}"
_MRTYDI_URL = "https://git.uwaterloo.ca/jimmylin/mr.tydi/-/raw/master/data/mrtydi-v1.1-{name}.tar.gz"


def _miracl_files(lang: str, split: str, files: Files) -> tuple[Path, Path, list[Path]]:
    got = files.get({k: ([f"{k}.miracl-v1.0-{lang}-{split}.tsv"], _MIRACL_URL.format(lang=lang, kind=k, split=split),
                         f"MIRACL {lang} {split} {k}") for k in ("topics", "qrels")})
    if files.root is not None:
        corpus = (sorted(storage.rglob(files.root, f"miracl-corpus-v1.0-{lang}/docs-*.jsonl*"))
                  or sorted(storage.rglob(files.root, f"miracl-corpus-v1.0-{lang}*.jsonl*")))
    else:
        tree = files.get({"tree": ((), _MIRACL_CORPUS_TREE.format(lang=lang), "MIRACL corpus listing")})["tree"]
        listing = json.loads(tree.read_text())  # the Hub's file listing of the corpus folder
        shards = sorted(e["path"] for e in listing if e.get("path", "").endswith(".jsonl.gz"))
        corpus = list(files.get({s: ((), _MIRACL_CORPUS_FILE.format(path=s), "MIRACL corpus shard")
                                 for s in shards}).values())
    if not corpus:
        raise DataError(f"{files.root}: no MIRACL {lang} corpus (miracl-corpus-v1.0-{lang}/docs-*.jsonl.gz) below it")
    return got["topics"], got["qrels"], corpus


def _mrtydi_files(lang: str, split: str, files: Files) -> tuple[Path, Path, list[Path]]:
    name = datasets.MRTYDI.names[lang]
    root = files.archive(_MRTYDI_URL.format(name=name))
    got = root.get({
        "topics": ([f"topics.mrtydi-v1.1-{lang}.{split}.txt.gz", f"topics.mrtydi-v1.1-{lang}.{split}.txt",
                    f"mrtydi-v1.1-{name}/topic.{split}.tsv"], "", f"Mr. TyDi {lang} {split} topics"),
        "qrels": ([f"qrels.mrtydi-v1.1-{lang}.{split}.txt", f"mrtydi-v1.1-{name}/qrels.{split}.txt"], "",
                  f"Mr. TyDi {lang} {split} qrels")})
    corpus = sorted(storage.rglob(root.root, f"mrtydi-v1.1-{name}/collection/docs.jsonl*"))
    if not corpus:
        raise DataError(f"{root.root}: no Mr. TyDi {lang} corpus (mrtydi-v1.1-{name}/collection/docs.jsonl.gz)")
    return got["topics"], got["qrels"], corpus


def _trec_reader(locate: Callable[[str, str, Files], tuple[Path, Path, list[Path]]]) -> Reader:
    def read(req: ReadRequest, files: Files, bad: BadRecords) -> list[ParallelUnit]:
        units: list[ParallelUnit] = []
        for lang in req.languages:
            topics, qrels, corpus = locate(lang, req.split, files)
            units += readers.read_trec_retrieval(lang, topics, qrels, corpus, source=req.kind,
                                                 max_negatives=req.max_negatives, on_bad=bad)
        return units

    return read


# ------------------------------------------------------------------------------------------------ user units

def _read_jsonl(req: ReadRequest, files: Files, bad: BadRecords) -> list[ParallelUnit]:
    local = files.root
    paths = [local] if local.is_file() else sorted(
        [*storage.rglob(local, "*.jsonl"), *storage.rglob(local, "*.jsonl.gz")])
    if not paths:
        raise DataError(f"{local}: no *.jsonl or *.jsonl.gz files (source jsonl)")
    units = readers.read_units_jsonl(paths, on_bad=bad)
    if req.languages:  # keep only the requested languages; a unit left with none is dropped, and counted
        keep = set(req.languages)
        kept = [ParallelUnit(u.id, u.source, {k: v for k, v in u.texts.items() if k in keep}) for u in units]
        dropped = sum(1 for u in kept if not u.texts)
        if dropped:
            log.info("jsonl source %s: %d units have none of the languages %s", local, dropped, req.languages)
        units = [u for u in kept if u.texts]
    return units


# ---------------------------------------------------------------------------------------------- the registry

for _kind in (
    SourceKind("xquad_r", _read_lareqa, datasets.XQUAD_R.origin, datasets.XQUAD_R.languages,
               local_files=_lareqa_names, licence="CC BY-SA 4.0"),
    SourceKind("mlqa_r", _read_lareqa, datasets.MLQA_R.origin, datasets.MLQA_R.languages, local_files=_lareqa_names,
               licence="CC BY-NC 4.0 (non-commercial research only; MLQA dev, withdrawn upstream)",
               non_commercial=True),
    SourceKind("mlqa", _read_mlqa, datasets.MLQA.origin, datasets.MLQA.languages, split="dev", options=("passage",),
               check=_check_passage, licence="CC BY-SA 3.0"),
    SourceKind("squad_translate", _read_squad_translate, datasets.SQUAD_TRANSLATE.origin,
               datasets.SQUAD_TRANSLATE.languages, options=("passage", "id_pattern"), check=_check_squad_translate,
               licence="CC BY-SA 4.0 (SQuAD); check the translation's own terms"),
    SourceKind("mmarco", _read_mmarco, datasets.MMARCO.origin, datasets.MMARCO.languages, options=("max_units",),
               check=_check_mmarco, licence="MS MARCO terms (non-commercial research only)", non_commercial=True),
    SourceKind("tydiqa_goldp", _read_tydiqa_goldp, datasets.TYDIQA_GOLDP.origin, datasets.TYDIQA_GOLDP.languages,
               licence="Apache-2.0"),
    SourceKind("miracl", _trec_reader(_miracl_files), datasets.MIRACL.origin, datasets.MIRACL.languages,
               licence="Apache-2.0"),
    SourceKind("mrtydi", _trec_reader(_mrtydi_files), datasets.MRTYDI.origin, datasets.MRTYDI.languages,
               licence="Apache-2.0"),
    SourceKind("jsonl", _read_jsonl, "your own parallel units (docs/architecture.md, 'Data')", needs_path=True,
               licence="your own data: not known to mlret, state it here"),
):
    register(_kind)
