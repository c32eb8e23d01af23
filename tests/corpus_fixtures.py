"""Session fixture for the corpus tests (sharded search, the ArrayRecord form): a MIRACL / Mr. TyDi style corpus
written from real text. The MIRACL and Mr. TyDi corpora are not in ../shared/data; XQuAD-R's sentences are.

Imported by tests/conftest.py so that every test module shares one instance.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def xquad_corpus(shared_data, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """Real XQuAD-R sentences (en, de, zh: 1,200) as Mr. TyDi docs.jsonl records in one plain file, the same as a
    folder of three .jsonl.gz shards (MIRACL's layout), and 40 real questions (also in queries.json beside)."""
    base = tmp_path_factory.mktemp("corpus")
    sents, questions = [], []
    for lang in ("en", "de", "zh"):
        data = json.loads((shared_data / "xquad-r" / f"{lang}.json").read_text())
        pars = [p for art in data["data"] for p in art["paragraphs"]]
        sents += [(f"{lang}-{i}", s) for i, s in enumerate(s for p in pars for s in p["sentences"])][:400]
        questions += [q["question"] for p in pars[:5] for q in p["qas"]][:14]
    plain = base / "docs.jsonl"
    plain.write_text("".join(json.dumps({"id": d, "contents": t}, ensure_ascii=False) + "\n" for d, t in sents))
    folder = base / "gz"
    folder.mkdir()
    for j in range(3):
        with gzip.open(folder / f"docs-{j}.jsonl.gz", "wt", encoding="utf-8") as f:
            for d, t in sents[j * 400:(j + 1) * 400]:
                f.write(json.dumps({"docid": d, "title": "", "text": t}, ensure_ascii=False) + "\n")
    (base / "queries.json").write_text(json.dumps(questions, ensure_ascii=False))
    return plain, folder, questions


@pytest.fixture(scope="session")
def xquad_array_record(xquad_corpus, tmp_path_factory) -> Path:
    """`xquad_corpus`'s .jsonl.gz folder in the ArrayRecord form (`write_array_record`): three shards of 400."""
    from mlret.eval.corpus import write_array_record

    out = tmp_path_factory.mktemp("corpus-ar") / "array_record"
    write_array_record(str(xquad_corpus[1]), str(out), shards=3, progress=False)
    return out
