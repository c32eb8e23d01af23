"""The passage corpus of MIRACL / Mr. TyDi style sets: which files make a corpus, what a record holds, and how to
read it (all of it here, one process's shard in `mlret.eval.sharded`).

A corpus takes one of two forms, local or gs://:
* jsonl: a .jsonl / .jsonl.gz file or a folder of such shards (name order), one record per line: MIRACL's
  `{"docid", "title"?, "text"}` or Mr. TyDi's `{"id", "contents"}`, either with an optional `"lang"` (the
  passage's language, which the per-language index needs in a corpus that mixes languages: every record or
  none carries it). Errors name `file:line`.
* ArrayRecord: a .array_record file or a folder of such shards (name order), each record the UTF-8 JSON of one
  such record. Record counts are known up front, so a process reads its records by random access
  (`read_records(files, lo, hi)`). ArrayRecord reads local files only: a gs:// corpus is copied once to its
  `storage.local_mirror` (`storage.download_file`). Errors name `file[i]`, i the 0-based record of that file.
  A folder of `corpus-XXXXX-of-YYYYY.array_record` shards (what the writer below makes) must hold all YYYYY.
A folder holding both forms is an error naming the folder.

`write_array_record(src, out_dir, shards)` turns a jsonl corpus into the ArrayRecord form, records checked and
kept in corpus order, cut into `shards` files of equal record counts; each file is written under a temporary name
and renamed when complete. From the command line:

    python -m mlret.eval.corpus --to-array-record IN.jsonl[.gz]|FOLDER OUT_FOLDER [--shards N]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter

from mlret import storage
from mlret.errors import DataError


def open_text(path: str) -> TextIO:
    """A UTF-8 text file, local or gs:// (`mlret.storage`), gunzipped when its name ends in .gz."""
    p = storage.path(path)
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=p.open("rb")), encoding="utf-8")
    return p.open("r", encoding="utf-8")


JSONL_PATTERNS = ("*.jsonl", "*.jsonl.gz")
ARRAY_RECORD_SUFFIX = ".array_record"
SHARD_NAME = "corpus-{index:05d}-of-{count:05d}" + ARRAY_RECORD_SUFFIX
_SHARD_RE = re.compile(r"corpus-(\d{5})-of-(\d{5})\.array_record")
_CHUNK = 4096  # records fetched per ArrayRecord read


def corpus_files(path: str) -> list[str]:
    """The corpus's files in name order (local or gs://): a .jsonl(.gz) or .array_record file, or every
    .jsonl(.gz) or every .array_record shard of a folder (a folder holding both is an error naming it)."""
    folder = storage.path(path)
    if folder.is_dir():
        jsonl = sorted(str(p) for pattern in JSONL_PATTERNS for p in folder.glob(pattern))
        arrays = sorted(str(p) for p in folder.glob("*" + ARRAY_RECORD_SUFFIX))
        if jsonl and arrays:
            raise DataError(f"{path}: folder holds both jsonl and ArrayRecord corpus shards ({len(jsonl)} and "
                            f"{len(arrays)}); keep one form per folder")
        if not jsonl and not arrays:
            raise FileNotFoundError(f"{path}: folder holds no .jsonl, .jsonl.gz or .array_record corpus shards")
        if arrays:
            _check_shard_set(path, arrays)
        return jsonl or arrays
    if not folder.exists():
        raise FileNotFoundError(f"{path}: corpus missing; set config.eval.<name>.corpus to a jsonl or ArrayRecord "
                                "file or folder (with {lang} for the language)")
    return [path]


def _check_shard_set(path: str, files: Sequence[str]) -> None:
    """`corpus-XXXXX-of-YYYYY.array_record` names (the writer's) must come as one complete set."""
    names = [m.groups() for f in files if (m := _SHARD_RE.fullmatch(os.path.basename(f)))]
    if not names:
        return
    counts = {int(n) for _, n in names}
    want = {(f"{i:05d}", f"{c:05d}") for c in counts for i in range(c)}
    if len(counts) > 1 or set(names) != want:
        missing = sorted(SHARD_NAME.format(index=int(i), count=int(c)) for i, c in want - set(names))
        raise DataError(f"{path}: an incomplete or mixed set of ArrayRecord shards (counts {sorted(counts)}"
                        + (f"; missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing
                           else "") + ")")


def is_array_record(files: Sequence[str]) -> bool:
    """Whether `corpus_files` found the ArrayRecord form."""
    return bool(files) and files[0].endswith(ARRAY_RECORD_SUFFIX)


def corpus_record(rec: Any, where: str | Callable[[], str],
                  passage_template: str = "{title} {text}") -> tuple[str, str]:
    """(docid, passage text) of one corpus record: MIRACL's {"docid", "title"?, "text"} or Mr. TyDi's
    {"id", "contents"}; `where` ("file:line", or a function giving it, called only on error) names the record."""
    docid = rec.get("docid", rec.get("id")) if isinstance(rec, dict) else None
    text = rec.get("text", rec.get("contents")) if isinstance(rec, dict) else None
    if docid is None or not isinstance(text, str):
        keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        where = where() if callable(where) else where
        raise DataError(f"{where}: a corpus record needs 'docid' and 'text' (MIRACL, optionally 'title') or "
                            f"'id' and 'contents' (Mr. TyDi); got keys {keys}")
    return str(docid), passage_template.format(title=rec.get("title") or "", text=text).strip()


def corpus_language(rec: Any, where: str | Callable[[], str]) -> str | None:
    """The record's `"lang"` (a non-empty string), or None when it has none."""
    lang = rec.get("lang") if isinstance(rec, dict) else None
    if lang is not None and (not isinstance(lang, str) or not lang):
        where = where() if callable(where) else where
        raise DataError(f"{where}: 'lang' must be a non-empty string (a language code), got {lang!r}")
    return lang


def check_languages(langs: Sequence[str | None], path: str) -> list[str] | None:
    """The records' languages when every record carries one, None when none does; a mix is an error naming the
    corpus and the first record without one."""
    missing = [i for i, x in enumerate(langs) if x is None]
    if not missing:
        return list(langs) if langs else None
    if len(missing) == len(langs):
        return None
    raise DataError(f"{path}: {len(missing)} of {len(langs)} corpus records have no 'lang' (the first is record "
                    f"{missing[0]} of this part); give every record a 'lang' or none")


def read_corpus(path: str, passage_template: str = "{title} {text}") -> tuple[list[str], list[str]]:
    """(docids, passage texts) of the whole corpus, either form (see `corpus_record`)."""
    files = corpus_files(path)
    if is_array_record(files):
        with ArrayRecordCorpus(files) as corpus:
            docids, texts = corpus.read(0, len(corpus), passage_template)
    else:
        docids, texts = _read_jsonl(files, passage_template)
    if len(set(docids)) != len(docids):
        raise DataError(f"{path}: docids repeat in the corpus")
    return docids, texts


def _read_jsonl(files: Sequence[str], passage_template: str) -> tuple[list[str], list[str]]:
    docids, texts = [], []
    for file, n, line in _jsonl_lines(files):
        where = f"{file}:{n}"
        docid, text = corpus_record(_json(line, where), where, passage_template)
        docids.append(docid)
        texts.append(text)
    return docids, texts


def _jsonl_lines(files: Sequence[str]) -> Iterator[tuple[str, int, str]]:
    """(file, 1-based line number, line) of every non-blank line of the jsonl files in order."""
    for file in files:
        with open_text(file) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield file, n, line


def _json(data: str | bytes, where: str | Callable[[], str]) -> Any:
    """One record's JSON; `where` (or a function giving it, called only on error) names it in the error."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where() if callable(where) else where}: not JSON ({e})") from None


# ------------------------------------------------------------------------------------------------ ArrayRecord


def _local_file(file: str) -> str:
    """A local path ArrayRecord can open: a gs:// file's local mirror (fetched once, `storage.download_file`)."""
    if storage.is_gcs(file):
        return os.fspath(storage.download_file(storage.path(file)))
    return os.fspath(storage.path(file))


class ArrayRecordCorpus:
    """The .array_record files of a corpus opened for random access (`ArrayRecordDataSource`, one per file, so
    that an error names the file and its record): `len()` is the corpus size, known before anything is read."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)
        self.sources = []
        for file in self.files:
            try:
                self.sources.append(ArrayRecordDataSource(_local_file(file)))
            except (RuntimeError, ValueError) as e:
                self.close()
                raise DataError(f"{file}: not a readable ArrayRecord file ({e})") from None
        self.counts = [len(src) for src in self.sources]
        self.starts = [0]
        for n in self.counts:
            self.starts.append(self.starts[-1] + n)

    def __len__(self) -> int:
        return self.starts[-1]

    def __enter__(self) -> ArrayRecordCorpus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for src in self.sources:
            src.__exit__(None, None, None)

    def records(self, lo: int, hi: int) -> Iterator[tuple[str, int, bytes]]:
        """(file, record of that file, bytes) of the corpus's records [lo, hi), read by random access."""
        lo, hi = max(lo, 0), min(hi, len(self))
        j = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            a, b = lo - self.starts[j], min(hi, self.starts[j + 1]) - self.starts[j]
            for c in range(a, b, _CHUNK):
                keys = list(range(c, min(c + _CHUNK, b)))
                try:
                    data = self.sources[j].__getitems__(keys)
                except (RuntimeError, ValueError) as e:
                    raise DataError(f"{self.files[j]}[{c}:{keys[-1] + 1}]: unreadable ArrayRecord records "
                                    f"({e})") from None
                for i, rec in zip(keys, data):
                    yield self.files[j], i, rec
            lo, j = self.starts[j + 1], j + 1

    def read(self, lo: int, hi: int, passage_template: str = "{title} {text}",
             languages: list[str | None] | None = None) -> tuple[list[str], list[str]]:
        """(docids, passage texts) of the corpus's records [lo, hi); each record's `corpus_language` is appended
        to `languages` when given."""
        docids, texts = [], []
        for file, i, data in self.records(lo, hi):
            where = lambda file=file, i=i: f"{file}[{i}]"
            rec = _json(data, where)
            docid, text = corpus_record(rec, where, passage_template)
            docids.append(docid)
            texts.append(text)
            if languages is not None:
                languages.append(corpus_language(rec, where))
        return docids, texts


def write_array_record(src: str, out_dir: str, shards: int = 1, *, progress: TextIO | bool = True,
                       every_s: float = 5.0) -> list[str]:
    """Write the jsonl corpus `src` (a file or folder, see `corpus_files`) into `out_dir` as `shards` ArrayRecord
    files `corpus-00000-of-0000N.array_record`, each record a line's JSON (checked with `corpus_record`), in
    corpus order, the files' record counts differing by at most one (a first pass counts the lines when
    shards > 1). Each file is written under a temporary name and renamed (uploaded, for gs://) only once all are
    complete, so that a crash never leaves a partial file under a final name. Prints a progress line to
    `progress` (True: stderr; False: none) at most every `every_s` seconds. Returns the files written."""
    progress = sys.stderr if progress is True else progress or None
    if shards < 1:
        raise ValueError(f"--shards {shards}: must be at least 1")
    files = corpus_files(src)
    if is_array_record(files):
        raise DataError(f"{src}: the corpus is already in the ArrayRecord form")
    out = storage.path(out_dir)
    if out.is_dir() and any(out.glob("*" + ARRAY_RECORD_SUFFIX)):
        raise FileExistsError(f"{out_dir}: holds .array_record files already; write into a new folder")
    total = sum(1 for _ in _jsonl_lines(files)) if shards > 1 else None
    bounds = [total * i // shards for i in range(shards + 1)] if total is not None else [0, float("inf")]
    names = [SHARD_NAME.format(index=i, count=shards) for i in range(shards)]
    remote = storage.is_gcs(out_dir)
    stage = storage.path(tempfile.mkdtemp(prefix="mlret-corpus-")) if remote else out
    stage.mkdir(parents=True, exist_ok=True)
    temps = [stage / f".{name}.tmp" for name in names]
    n, shard, writer, last = 0, -1, None, time.monotonic()

    def report(final: bool = False) -> None:
        if progress is not None:
            of = f" of {total}" if total is not None else ""
            progress.write(f"\r{src} -> {out_dir}: {n}{of} records, shard {max(shard, 0) + 1} of {shards}"
                           + ("\n" if final else ""))
            progress.flush()

    try:
        for file, line_no, line in _jsonl_lines(files):
            where = f"{file}:{line_no}"
            corpus_record(_json(line, where), where)
            while n >= bounds[shard + 1]:
                if writer is not None:
                    writer.close()
                shard += 1
                writer = ArrayRecordWriter(os.fspath(temps[shard]), "group_size:1")
            writer.write(line.strip().encode("utf-8"))
            n += 1
            if progress is not None and time.monotonic() - last >= every_s:
                report()
                last = time.monotonic()
        if writer is not None:
            writer.close()
        for j in range(shard + 1, shards):  # shards nothing fell into (fewer records than shards, or none)
            ArrayRecordWriter(os.fspath(temps[j]), "group_size:1").close()
        report(final=True)
        out.mkdir(parents=True, exist_ok=True)
        for tmp, name in zip(temps, names):
            if remote:
                storage.copy_file(tmp, out / name)
                tmp.unlink()
            else:
                tmp.rename(out / name)
    finally:
        if writer is not None and writer.is_open():
            writer.close()
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()
        if remote:
            shutil.rmtree(os.fspath(stage), ignore_errors=True)
    return [str(out / name) for name in names]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlret.eval.corpus",
                                description="Prepare a jsonl corpus (MIRACL / Mr. TyDi records) as ArrayRecord "
                                            "shards that each process reads its part of by random access.")
    p.add_argument("--to-array-record", nargs=2, metavar=("IN", "OUT_FOLDER"), required=True,
                   help="IN: a .jsonl / .jsonl.gz file or a folder of them; OUT_FOLDER: where the shards go")
    p.add_argument("--shards", type=int, default=1, help="how many files (equal record counts)")
    a = p.parse_args(argv)
    try:
        written = write_array_record(*a.to_array_record, a.shards)
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print("\n".join(written))


if __name__ == "__main__":
    main()
