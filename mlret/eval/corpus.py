"""The jsonl passage corpus of MIRACL / Mr. TyDi style sets: which files make a corpus and what a record holds.

A corpus is a .jsonl / .jsonl.gz file or a folder of such shards (name order), one record per line: MIRACL's
`{"docid", "title"?, "text"}` or Mr. TyDi's `{"id", "contents"}`. `mlret.eval.sharded` reads a process's byte range
of it, `read_corpus` the whole of it.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable
from typing import Any, TextIO

from mlret import storage
from mlret.errors import DataError


def open_text(path: str) -> TextIO:
    """A UTF-8 text file, local or gs:// (`mlret.storage`), gunzipped when its name ends in .gz."""
    p = storage.path(path)
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=p.open("rb")), encoding="utf-8")
    return p.open("r", encoding="utf-8")


def corpus_files(path: str) -> list[str]:
    """A .jsonl(.gz) file, or every .jsonl(.gz) shard of a folder in name order (local or gs://)."""
    folder = storage.path(path)
    if folder.is_dir():
        files = sorted(str(p) for pattern in ("*.jsonl", "*.jsonl.gz") for p in folder.glob(pattern))
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no .jsonl or .jsonl.gz corpus shards")
        return files
    if not folder.exists():
        raise FileNotFoundError(f"{path}: corpus missing; set config.eval.<name>.corpus to a jsonl file or folder "
                                "(with {lang} for the language)")
    return [path]


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


def read_corpus(path: str, passage_template: str = "{title} {text}") -> tuple[list[str], list[str]]:
    """(docids, passage texts) from jsonl corpus records (see `corpus_record`)."""
    docids, texts = [], []
    for file in corpus_files(path):
        with open_text(file) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{n}: not JSON ({e})") from None
                docid, text = corpus_record(rec, f"{file}:{n}", passage_template)
                docids.append(docid)
                texts.append(text)
    if len(set(docids)) != len(docids):
        raise DataError(f"{path}: docids repeat in the corpus")
    return docids, texts
