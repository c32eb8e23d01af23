"""Zero-shot evaluation on XQuAD-R (LAReQA protocol: mono, cross, multilingual) with sentence-only candidates.

    python -m mlret.evaluate --config configs/eval_xquad_r.py --hf <model folder or hub id> --out F.json

Defaults match all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling, L2-normalised, no prefixes,
256 tokens at most (its max_seq_length). A sentence-transformers folder given to `--hf` replaces them with its
own (pooling, normalisation, prompts, max_seq_length; `--config.*` flags override the folder). For a plain
transformers folder of multilingual-e5 add `--config.model.query_prefix="query: "
--config.model.passage_prefix="passage: "`.
"""

import os
from pathlib import Path

from mlret.config import default_config

_REPO = Path(__file__).resolve().parents[1]


def get_config():
    c = default_config()
    c.data.data_dir = os.environ.get("MLRET_DATA_DIR") or str(_REPO.parent / "shared" / "data")
    c.model.pooling = "mean"
    c.model.normalize = True
    c.model.query_prefix = ""
    c.model.passage_prefix = ""
    c.data.query_len = 256
    c.data.passage_len = 256
    c.mesh.data = -1
    c.eval.evaluators = "xquad_r"
    c.eval.xquad_r.candidate_context = "none"
    c.eval.xquad_r.settings = "mono,cross,multi"
    c.eval.batch_size = 128
    return c
