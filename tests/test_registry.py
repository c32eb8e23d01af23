"""An evaluator from outside mlret is one record: registered at runtime, it gets its config section, its
validation and its run through `python -m mlret.evaluate`'s command line like the built-in benchmarks.

The toy evaluator below (defined here, registered by the config file the test writes) ranks a list of sentences
encoded as passages for each sentence encoded as a query. With tied towers and no prefixes a sentence's query and
passage embeddings are the same function of the same tokens, so every sentence must retrieve itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np

from mlret.eval.base import EvalContext, EvalResult, EvaluatorSpec, PerQuery, embed

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


class SelfRetrieval:
    """Top-1 of each sentence (as a query) among all of them (as passages)."""

    def __init__(self, name: str, path: str, max_sentences: int):
        self.name, self.path, self.max_sentences = name, path, max_sentences

    def run(self, embedder, output_dir=None):
        texts = Path(self.path).read_text(encoding="utf-8").splitlines()[: self.max_sentences or None]
        q = embed(embedder.queries, texts, f"{self.name} queries")
        p = embed(embedder.passages, texts, f"{self.name} passages")
        hits = (np.argmax(q @ p.T, axis=1) == np.arange(len(texts))).astype(np.float64)
        summary = {"self_top1": float(np.mean(hits)), "mean_norm": float(np.linalg.norm(q, axis=1).mean()),
                   "sentences": float(len(texts))}
        return EvalResult(summary=summary,
                          per_query={"sentences": PerQuery([str(i) for i in range(len(texts))], [""] * len(texts),
                                                           {"self_top1": hits})})


def _defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.path = ""  # one sentence per line
    s.max_sentences = 0  # >0: the first ones only
    return s


def _validate(section: ml_collections.ConfigDict, ctx: EvalContext) -> None:
    if section.max_sentences < 0:
        raise ctx.fail("max_sentences", f"{section.max_sentences} must be >= 0")
    if ctx.active and not section.path:
        raise ctx.fail("path", "empty; name a file with one sentence per line")


TOY = EvaluatorSpec("toy_self", _defaults, lambda s, ctx: SelfRetrieval(ctx.name, s.path, s.max_sentences),
                    _validate, files=lambda ev: [ev.path], files_field="path", origin="the test's own sentences")


def register_toy() -> None:
    from mlret.eval import register

    register(TOY)


CONFIG = '''
import sys

sys.path.insert(0, {tests!r})
from test_registry import register_toy

register_toy()  # before default_config(): the schema then has config.eval.toy_self

from mlret.config import default_config


def get_config():
    c = default_config()
    c.model.tied, c.model.query_prefix, c.model.passage_prefix = True, "", ""
    c.eval.evaluators = "toy_self"
    c.eval.toy_self.path = {path!r}
    c.data.query_len = c.data.passage_len = 32  # the random test model has 128 positions
    c.eval.batch_size = 16
    c.eval.progress = False
    c.eval.length_buckets = False  # one program per tower: a short compile
    c.train.compilation_cache_dir = ""
    return c
'''


def evaluate_cli(tmp_path: Path, model: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "mlret.evaluate", "--config", str(tmp_path / "toy_config.py"),
                           "--hf", str(model), "--out", str(tmp_path / "toy.json"), *overrides],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_a_registered_toy_evaluator_runs_through_the_evaluate_cli(tmp_path, random_bert_path, xquad_sentences):
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(xquad_sentences) + "\n", encoding="utf-8")
    (tmp_path / "toy_config.py").write_text(CONFIG.format(tests=str(TESTS), path=str(sentences)), encoding="utf-8")

    done = evaluate_cli(tmp_path, random_bert_path, "--config.eval.toy_self.max_sentences=40")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "toy.json").read_text())
    summary = report["summary"]["toy_self"]
    assert summary["sentences"] == 40  # the command-line override of the plugin's own field took effect
    assert summary["self_top1"] == 1.0
    assert abs(summary["mean_norm"] - 1.0) < 1e-5  # config.model.normalize reached the embedder
    assert report["eval_config"]["toy_self"] == {"path": str(sentences), "max_sentences": 40}
    assert "toy_self" in done.stdout and "self_top1" in done.stdout  # the printed table

    # Its validation runs in mlret.config.validate, naming its field, before any model is loaded.
    bad = evaluate_cli(tmp_path, random_bert_path, "--config.eval.toy_self.max_sentences=-1")
    assert bad.returncode != 0 and "config.eval.toy_self.max_sentences: -1 must be >= 0" in bad.stderr
    # And its pre-flight file list is the record's too.
    from mlret.config import default_config
    from mlret.eval import registry
    from mlret.preflight import missing_data

    register_toy()
    try:
        c = default_config()
        c.eval.evaluators = "toy_self"
        c.eval.toy_self.path = str(tmp_path / "nowhere.txt")
        (missing,) = missing_data(c, sources=False)
        assert missing.files == (str(tmp_path / "nowhere.txt"),) and missing.field == "config.eval.toy_self.path"
    finally:
        registry.unregister("toy_self")


# ------------------------------------------------- plug-ins bring their own card text: licence and protocol


def _read_toy_units(req, files, bad):
    """A training-source kind defined here: MLQA-R's answer-sentence files (by their public names) read under
    the kind's own name."""
    from mlret.data import readers

    paths = files.get({lang: ([f"{lang}.json"], "", f"toy {lang} file") for lang in req.languages})
    return readers.read_squad_sentences(paths, source=req.kind, paragraph_context=False,
                                        max_negatives=req.max_negatives, on_bad=bad)


TOY_LICENCE = "toy licence: the test's own copy, no rights granted"
TOY_PROTOCOL = "Toy protocol: each sentence, as a query, must retrieve itself among all of them as passages."


def test_a_registered_source_kind_and_evaluator_bring_their_licence_and_protocol_to_the_card(
        random_bert_path, shared_data, xquad_sentences, tmp_path):
    import dataclasses

    import jax
    import pytest
    from test_train_export import tiny_config

    from mlret.config import validate
    from mlret.data.kinds import KINDS, SourceKind
    from mlret.data.kinds import register as register_kind
    from mlret.errors import ConfigError
    from mlret.eval import registry
    from mlret.train import train

    kind = register_kind(SourceKind("toy_units", _read_toy_units, "the test's copy of MLQA-R", ("de", "en", "es"),
                                    local_files=lambda langs, split: [f"{x}.json" for x in langs],
                                    licence=TOY_LICENCE))
    unlicensed = register_kind(dataclasses.replace(kind, name="toy_unlicensed", licence=""))
    registry.register(dataclasses.replace(TOY, name="toy_card", protocol=TOY_PROTOCOL))
    try:
        sentences = tmp_path / "sentences.txt"
        sentences.write_text("\n".join(xquad_sentences) + "\n", encoding="utf-8")
        c = tiny_config(random_bert_path, shared_data, tmp_path / "tfds")  # default_config() after the registrations
        c.data.sources = ({"name": "toy_unlicensed", "path": "mlqa-r"},)
        # A kind without a licence is refused before anything runs, naming the entry (not a KeyError at export).
        with pytest.raises(ConfigError, match=r"config.data.sources\[0\].name: the source kind 'toy_unlicensed' has "
                                              r"no licence \(SourceKind.licence"):
            validate(c)
        c.data.sources = ({"name": "toy_units", "path": "mlqa-r"},)
        c.train.steps, c.eval.every, c.eval.at_start = 2, 2, False
        c.eval.evaluators, c.eval.toy_card.path, c.eval.toy_card.max_sentences = "toy_card", str(sentences), 24
        validate(c, devices=jax.device_count(), processes=1)
        result = train(c, tmp_path / "run")
        assert result.end_step == 2 and result.eval_results["toy_card"].summary["sentences"] == 24
        card = (tmp_path / "run" / "export" / "README.md").read_text()
        assert f"| toy_units | data/mlqa-r | all | {TOY_LICENCE} |" in card  # the training-data table's row
        assert "### toy_card\n\n" + TOY_PROTOCOL in card
    finally:
        registry.unregister("toy_card")
        for k in (kind, unlicensed):
            KINDS.pop(k.name)
