"""Passage retrieval scored like trec_eval (nDCG@10, Recall@100, MRR@100): Mr. TyDi or MIRACL.

    python -m mlret.evaluate --config configs/eval_trec.py:mrtydi --hf MODEL \\
        --config.eval.mrtydi.data_dir=TOPICS_AND_QRELS --config.eval.mrtydi.corpus=CORPUS \\
        --config.eval.mrtydi.languages=en,de --out F.json

The argument picks the layout (`mrtydi`, the default, or `miracl`); `data_dir` holds the topics and qrels
(Mr. TyDi: `topics.mrtydi-v1.1-{lang}.{split}.txt.gz` and `qrels.mrtydi-v1.1-{lang}.{split}.txt`; MIRACL:
`topics.miracl-v1.0-{lang}-{split}.tsv` and `qrels.miracl-v1.0-{lang}-{split}.tsv`); `corpus` is a jsonl(.gz) or
ArrayRecord file or folder, one path for every language or one per language with `{lang}` in it (records
`{"id", "contents"}` or `{"docid", "title", "text"}`, with an optional `"lang"`). The README's "Mr. TyDi and MIRACL"
section builds a small set from XQuAD-R (`scripts/xquad_trec.py`) and runs this config on it.

Search: exact up to `scann_threshold` passages, ScaNN above, one tree per passage language, recall against exact
search measured on 1,000 topics and an exact search again below `recall_floor` (`config.eval.retrieval`). A
sentence-transformers model folder supplies its own pooling, prompts and max_seq_length (`mlret.evaluate --hf`).
"""

import os
from pathlib import Path

from mlret.config import default_config
from mlret.errors import ConfigError

_REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ("mrtydi", "miracl")


def get_config(layout: str = "mrtydi"):
    if layout not in LAYOUTS:
        raise ConfigError(f"configs/eval_trec.py:{layout}: the layout is one of {', '.join(LAYOUTS)}")
    c = default_config()
    c.data.data_dir = os.environ.get("MLRET_DATA_DIR") or str(_REPO.parent / "shared" / "data")
    c.model.pooling = "mean"
    c.model.normalize = True
    c.data.query_len = 128
    c.data.passage_len = 256
    c.mesh.data = -1
    c.eval.evaluators = layout
    c.eval.batch_size = 128
    c.eval[layout].split = "dev"
    c.eval.retrieval.method = "auto"
    c.eval.retrieval.per_language_index = True
    return c
