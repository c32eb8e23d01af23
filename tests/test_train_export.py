"""The end of a training run with config.export.dir (what the README's demo relies on): the last evaluation's
results are kept, the trained weights are exported as a Hugging Face folder with them in the model card, and a
finished run started again evaluates once and exports the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file

from mlret.card import base_model_name
from mlret.config import load_config_file, validate

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
    c.eval.at_start = True  # the zero-shot numbers the card and the console put beside the trained ones
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
    from mlret.train import train

    c = tiny_config(random_bert_path, shared_data, tmp_path / "tfds")
    validate(c, devices=jax.device_count(), processes=1)
    workdir = tmp_path / "run"
    result = train(c, workdir)
    assert result.end_step == 3 and result.export_dir == str(workdir / "export")
    assert set(result.eval_results) == {"xquad_r"}
    out = workdir / "export"
    for name in ("config.json", "model.safetensors", "modules.json", "config_sentence_transformers.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert f"{result.eval_results['xquad_r'].summary['multi_map']:.4f}" in card
    assert_card_is_complete(card, c, result)

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
    assert again.eval_results["xquad_r"].summary == result.eval_results["xquad_r"].summary
    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))[key], exported[key])


def assert_card_is_complete(card: str, c, result) -> None:
    """The model card of a trained run carries what a user of the exported folder needs (issue 19, item 3)."""
    from mlret.data.kinds import KINDS
    from mlret.data.sources import parse_sources
    from mlret.eval.report import comparison

    # Evaluation: the protocol, the table with the zero-shot numbers beside the trained ones, the commands.
    zero, trained = result.zero_shot["xquad_r"], result.eval_results["xquad_r"].summary
    assert "LAReQA" in card and "rank distance" in card
    for line in comparison("xquad_r", trained, zero, step=3).markdown():
        assert line in card, line
    assert f"{zero['multi_map']:.3f} -> {trained['multi_map']:.3f}" in card
    assert not c.workdir and "python -m mlret.evaluate --checkpoint RUN_DIR" in card and "--hf PATH" in card
    # Training configuration: start model, every source with its licence, alpha, loss, steps, batch, lengths.
    assert base_model_name(c.model.name).text in card and f"`{c.model.name}`" not in card  # no path of this machine
    for spec in parse_sources(c):
        assert f"| {spec.name} |" in card and KINDS[spec.name].licence in card
    assert f"α = {c.data.alpha:g}" in card and f"temperature {c.loss.temperature:g}" in card
    assert f"| steps | {c.train.steps} |" in card and f"| global batch | {c.data.global_batch} pairs" in card
    assert f"query {c.data.query_len}, passage {c.data.passage_len} tokens" in card
    # Languages seen in training and those only evaluated (en, de evaluated here).
    assert "| languages seen in training |" in card and "Only evaluated (not in the training data):" in card
    assert "Languages: en, de." in card
    # Loading in sentence-transformers and transformers, with the prefixes.
    assert "SentenceTransformer(" in card and "encode_query" in card and "AutoModel.from_pretrained" in card
    assert f"| query prefix / prompt `query` | {json.dumps(c.model.query_prefix)} |" in card
