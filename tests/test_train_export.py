"""The end of a training run with config.export.dir (what the README's demo relies on): the last evaluation's
results are kept, the trained weights are exported as a Hugging Face folder with them in the model card, and a
finished run started again evaluates once and exports the same weights."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file

from mlret.config import load_config_file

REPO = Path(__file__).resolve().parents[1]


def tiny_config(random_bert_path, shared_data, tfds_dir):
    c = load_config_file(REPO / "configs" / "smoke.py")
    c.model.name = str(random_bert_path)
    c.data.data_dir = str(shared_data)
    c.data.tfds_dir = str(tfds_dir)
    c.data.global_batch = 8
    c.data.query_len, c.data.passage_len = 16, 32
    c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 1
    c.mesh.data = 8
    c.mesh.simulated_cpu_devices = 0
    c.train.steps = 3
    c.eval.every = 3
    c.eval.evaluators = "xquad_r"
    c.eval.xquad_r.languages = "en,de"
    c.eval.xquad_r.max_paragraphs = 2
    c.eval.xquad_r.settings = "mono,multi"
    c.eval.plots = False
    c.eval.progress = False
    c.checkpoint.every = 0
    c.checkpoint.keep = 1
    c.export.dir = "export"
    return c


def test_export_at_the_end_of_training(random_bert_path, shared_data, tmp_path, capsys):
    from mlret.checkpoint import restore_for_export
    from mlret.models import encoder_to_tensors
    from mlret.train import train, validate_run

    c = tiny_config(random_bert_path, shared_data, tmp_path / "tfds")
    validate_run(c, jax.device_count(), 1)
    workdir = tmp_path / "run"
    result = train(c, workdir)
    assert result.end_step == 3 and result.export_dir == str(workdir / "export")
    assert set(result.eval_results) == {"xquad_r"}
    out = workdir / "export"
    for name in ("config.json", "model.safetensors", "modules.json", "config_sentence_transformers.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert f"{result.eval_results['xquad_r']['summary']['multi_map']:.4f}" in card

    # The exported tensors are the trained ones (the run's final checkpoint), not the starting weights.
    exported = load_file(str(out / "model.safetensors"))
    _, model, _ = restore_for_export(workdir)
    trained = {k: np.asarray(v) for k, v in encoder_to_tensors(model.towers.query).items()}
    start = load_file(str(Path(random_bert_path) / "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    np.testing.assert_allclose(exported[key], trained[key], rtol=0, atol=0)
    assert not np.allclose(exported[key], start[key])

    # Started again, the finished run trains nothing, evaluates once and exports again.
    (out / "model.safetensors").unlink()
    again = train(c, workdir)
    assert again.start_step == again.end_step == 3 and not again.losses
    assert again.eval_results["xquad_r"]["summary"] == result.eval_results["xquad_r"]["summary"]
    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))[key], exported[key])
