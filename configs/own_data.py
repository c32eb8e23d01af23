"""Train on your own parallel QA data (docs/own-data.md): a JSONL file (or folder of them) of parallel units.

    python -m mlret.train --config configs/own_data.py:my_units.jsonl --workdir runs/own

The argument is the path of the file or folder (relative to where the command runs). Everything else is the
demo's (configs/demo.py: multilingual-e5-small, hybrid batches with alpha = 0.5, batch 16, lengths 32 / 64, an
XQuAD-R and Tatoeba subset evaluated zero-shot before and after training, export to <workdir>/export) except the
training data and the number of steps; override any field, e.g. `--config.train.steps=500` or
`--config.eval.every=0` (no evaluation, so no ../shared/data needed).
"""

from __future__ import annotations

from pathlib import Path

from mlret.config import load_config_module

STEPS = 100
EVAL_EVERY = 50


def get_config(path: str | None = None):
    if not path:
        raise ValueError("configs/own_data.py needs the path of your units: --config configs/own_data.py:FILE.jsonl")
    c = load_config_module(Path(__file__).with_name("demo.py")).get_config()
    c.data.sources = ({"name": "jsonl", "path": str(Path(path).expanduser().absolute())},)
    c.workdir = "runs/own"
    c.train.steps = STEPS
    c.optim.warmup_steps = max(1, STEPS // 10)
    c.eval.every = EVAL_EVERY
    c.checkpoint.every = EVAL_EVERY
    return c
