"""`mlret.evaluate --checkpoint` on a real (tiny) training run: it restores the run's model and reports the same
numbers the periodic evaluation logged inside training at that step."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from mlret.config import load_config_file, validate
from mlret.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]


def smoke_config():
    return load_config_file(REPO / "configs" / "smoke.py")


def eval_section(c, shared_data):
    c.data.data_dir = str(shared_data)
    c.eval.evaluators = "xquad_r"
    c.eval.xquad_r.languages = "en,de,zh"
    c.eval.xquad_r.max_paragraphs = 3
    c.eval.plots = False
    c.eval.progress = False


def test_checkpoint_evaluation_matches_the_training_eval(random_bert_path, shared_data, tmp_path):
    from mlret.evaluate import evaluate
    from mlret.train import train

    c = smoke_config()
    c.model.name = str(random_bert_path)
    c.data.tfds_dir = str(tmp_path / "tfds")
    c.data.global_batch = 8
    c.data.query_len, c.data.passage_len = 16, 32
    c.train.steps = 2
    c.train.log_every = 1
    c.optim.warmup_steps = 1
    c.optim.learning_rate = 1e-3
    c.checkpoint.every = 0
    c.eval.every = 2
    eval_section(c, shared_data)
    validate(c, devices=jax.device_count(), processes=1)
    run_dir = tmp_path / "run"
    train(c, run_dir)
    logged = next(r for r in read_metrics(run_dir) if "xquad_r/multi_map" in r)
    assert logged["step"] == 2

    # The run's config says what the model is; this config says how to evaluate (here: the same way).
    ev = smoke_config()
    eval_section(ev, shared_data)
    out = tmp_path / "ckpt.json"
    report = evaluate(ev, checkpoint=str(run_dir), out=str(out))
    summary = json.loads(out.read_text())["results"]["xquad_r"]["summary"]
    assert report["source"]["checkpoint"] == str(run_dir.absolute())
    for key, value in summary.items():
        assert value == pytest.approx(logged[f"xquad_r/{key}"], abs=1e-6), key
