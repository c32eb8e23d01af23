"""scripts/study.py without a model: its per-query values reproduce the evaluators' summaries, its paired test
and Holm adjustment behave, and the report (tables, tests, figures, results.md section) is built from run files;
and with the tiny model, its training runs through mlret's loop: the same losses as `mlret.train.train`.

The embedder is mlret.eval.base.NgramEmbedder (real, imperfect rankings of the real XQuAD-R / Tatoeba text)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mlret.eval.base import NgramEmbedder

REPO = Path(__file__).resolve().parents[1]
LANGS = ("ar", "de", "en", "zh")


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_script", REPO / "scripts" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ngram_results(study, shared_data):
    """(result blocks, per_query) of the NgramEmbedder on an XQuAD-R slice and a Tatoeba slice: the study's
    tested per-query values, taken from the evaluators' per-query results."""
    from mlret.eval import run_evaluators
    from mlret.eval.lareqa import LareqaEvaluator
    from mlret.eval.tatoeba import TatoebaEvaluator

    evaluators = [LareqaEvaluator("xquad_r", str(shared_data / "xquad-r"), LANGS, max_paragraphs=3, plots=False),
                  TatoebaEvaluator("tatoeba", str(shared_data / "tatoeba" / "v1"), ("deu", "cmn"), max_sentences=40)]
    results = run_evaluators(evaluators, NgramEmbedder())
    return {name: r.block() for name, r in results.items()}, study.per_query_values(results)


def macro(per_query: dict[str, float]) -> float:
    by_lang: dict[str, list[float]] = {}
    for key, v in per_query.items():
        by_lang.setdefault(key.split(":")[0], []).append(v)
    return float(np.mean([np.mean(v) for v in by_lang.values()]))


def test_per_query_values_reproduce_the_evaluator_summaries(ngram_results):
    results, per_query = ngram_results
    summary = results["xquad_r"]["summary"]
    for key in ("mono_map", "cross_map", "multi_map", "multi_r10", "rank_distance", "mono_mrr", "mono_acc1",
                "cross_mrr", "cross_acc1", "multi_mrr", "multi_acc1"):
        assert macro(per_query[key]) == pytest.approx(summary[key], rel=1e-9, abs=1e-12), key
    n_questions = sum(results["xquad_r"]["queries"].values())
    assert all(len(per_query[k]) == n_questions for k in ("mono_map", "multi_map", "rank_distance"))
    assert macro(per_query["tatoeba_acc"]) == pytest.approx(results["tatoeba"]["summary"]["acc"], rel=1e-9)


def test_paired_test_and_holm(study):
    rng = np.random.default_rng(0)
    a = rng.normal(size=300)
    same = study.paired_test(a, a, 2000, np.random.default_rng(1))
    assert same["mean_diff"] == 0 and same["p"] == 1.0 and same["wins"] == same["losses"] == 0
    shifted = study.paired_test(a + 0.5 + rng.normal(scale=0.5, size=300), a, 2000, np.random.default_rng(1))
    assert shifted["p"] < 0.01 and shifted["ci_low"] > 0 and shifted["wins"] > shifted["losses"]
    noise = study.paired_test(a + rng.normal(size=300), a, 2000, np.random.default_rng(1))
    assert noise["ci_low"] < noise["mean_diff"] < noise["ci_high"]
    p = [0.01, 0.04, 0.03, 0.2]
    adjusted = study.holm(p)
    assert all(x >= y for x, y in zip(adjusted, p))
    order = np.argsort(p)
    assert all(adjusted[order[i]] <= adjusted[order[i + 1]] for i in range(len(p) - 1))  # monotone in p
    assert adjusted[order[0]] == pytest.approx(len(p) * min(p))


def test_interaction_test(study):
    """Gaps that differ only by noise across losses are not an interaction; one loss shifting its gap is."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=200)
    same = study.interaction_test(np.stack([base + rng.normal(scale=0.3, size=200) for _ in range(4)]), 500,
                                  np.random.default_rng(1))
    assert same["p"] > 0.05 and len(same["mean_gaps"]) == 4
    gaps = np.stack([base + rng.normal(scale=0.3, size=200) for _ in range(4)])
    gaps[2] += 0.3
    shifted = study.interaction_test(gaps, 500, np.random.default_rng(1))
    assert shifted["p"] < 0.01 and np.argmax(shifted["mean_gaps"]) == 2


def test_plan_is_seed_major_and_starts_with_zero_shot(study):
    runs = study.plan_runs(["me5", "minilm"], ["eq1", "infonce"], ["0.5", "1", "0"], ["0.5", "1"], ["0", "1"])
    assert runs[0] == ("me5", None, None, None)
    assert runs[1:7] == [("me5", "eq1", 0.5, 0), ("me5", "eq1", 1.0, 0), ("me5", "eq1", 0.0, 0),
                         ("me5", "infonce", 0.5, 0), ("me5", "infonce", 1.0, 0), ("me5", "infonce", 0.0, 0)]
    assert runs[13] == ("minilm", None, None, None) and len(runs) == 1 + 12 + 1 + 8
    assert study.run_file(Path("o"), runs[1]) == Path("o/me5/eq1_alpha0.5_seed0.json.gz")
    cells = study.plan_runs(["me5"], [], [], [], ["0", "1"], ["infonce:0.5", "eq1:0.5", "infonce:0"])
    assert cells[1:] == [("me5", "infonce", 0.5, 0), ("me5", "eq1", 0.5, 0), ("me5", "infonce", 0.0, 0),
                         ("me5", "infonce", 0.5, 1), ("me5", "eq1", 0.5, 1), ("me5", "infonce", 0.0, 1)]


def test_loss_rows_are_configs_the_trainer_accepts(study):
    """Every loss row, on the CPU base and under the GPU preset, is a valid config with the loss it names."""
    from mlret.config import load_config_module, validate
    from mlret import losses

    gpu = load_config_module(REPO / "configs" / "study.py").GPU_OVERRIDES
    for loss in study.LOSS_NAMES:
        validate(study.load_config("me5", list(gpu), loss))
        config = study.load_config("me5", ["train.steps=3"], loss)
        validate(config)
        assert config.train.steps == 3
        opts = losses.spec(config.loss).terms[0].options
        assert opts.in_batch_positives == (loss != "eq1") and opts.symmetric == (loss in ("symmetric", "vrn"))
        assert (opts.vrn_weight > 0) == (loss == "vrn")


def test_report_from_run_files(study, ngram_results, tmp_path):
    """Fake runs (the n-gram results, perturbed per cell and seed) go through the whole report: the hybrid gap
    is 0.05 under infonce and 0.0 under eq1, so the interaction test must see it."""
    results, per_query = ngram_results
    rng = np.random.default_rng(3)
    out = tmp_path / "runs"
    cells = [(None, None, 0.0)] + [(loss, alpha, shift) for loss, gap in (("eq1", 0.0), ("infonce", 0.05))
                                   for alpha, shift in ((1.0, 0.0), (0.0, 0.02), (0.5, gap))]
    for loss, alpha, shift in cells:
        for seed in ((None,) if alpha is None else (0, 1)):
            pq = {m: {k: (v + shift + rng.normal(scale=0.01) if m != "rank_distance" else v * (1 - shift))
                      for k, v in vals.items()} for m, vals in per_query.items()}
            res = copy.deepcopy(results)
            res["xquad_r"]["summary"]["multi_mrr"] += shift
            run = {"model": "ngram", "model_name": "ngram-512", "loss": loss, "alpha": alpha, "seed": seed,
                   "losses": [2.0, 1.0], "train_seconds": 1.0, "eval_seconds": 1.0,
                   "results": study.strip_results(res), "per_query": pq, "config": {}}
            study.write_json(study.run_file(out, ("ngram", loss, alpha, seed)), run)
    docs = tmp_path / "docs"
    report = study.build_report(out, docs, 500)
    m = report["models"]["ngram"]
    rows = {(r["loss"], r["setting"]): r for r in m["rows"]}
    assert len(rows) == 1 + 6 and rows[("infonce", "hybrid (α=0.5)")]["seeds"] == 2
    assert rows[("infonce", "hybrid (α=0.5)")]["metrics"]["multi_mrr"][0] == pytest.approx(
        results["xquad_r"]["summary"]["multi_mrr"] + 0.05)
    tests = m["tests"]
    assert {(t["loss"], t["baseline"]) for t in tests} == {(x, b) for x in ("eq1", "infonce")
                                                          for b in ("X-X-mono (α=1)", "X-Y (α=0)")}
    mrr = next(t for t in tests if t["metric"] == "multi_mrr" and t["baseline"] == "X-X-mono (α=1)"
               and t["loss"] == "infonce")
    assert mrr["mean_diff"] == pytest.approx(0.05, abs=0.01) and mrr["n"] == len(
        {k.split(":")[1] for k in per_query["multi_mrr"]})  # paired over questions, not (language, question)
    assert len(mrr["seed_gaps"]) == 2 and np.mean(mrr["seed_gaps"]) == pytest.approx(mrr["mean_diff"], abs=1e-12)
    assert all(g == pytest.approx(0.05, abs=0.01) for g in mrr["seed_gaps"])
    inter = next(t for t in m["interaction"] if t["metric"] == "multi_mrr" and t["baseline"] == "X-X-mono (α=1)")
    assert inter["losses"] == ["eq1", "infonce"] and inter["p"] < 0.01
    assert inter["mean_gaps"][1] - inter["mean_gaps"][0] == pytest.approx(0.05, abs=0.01)
    figures = m["figures"]
    assert all((docs / f).is_file() for f in figures) and any("two_way" in f for f in figures)
    assert any("gaps" in f for f in figures)
    results_md = tmp_path / "results.md"
    results_md.write_text("# Results\n\n## Zero-shot baseline\n\nkept text\n")
    for _ in range(2):  # idempotent: the second write replaces the first section
        study.update_results_md(results_md, study.markdown(report, out, docs, results_md, ["a scale note"]))
    text = results_md.read_text()
    assert "kept text" in text and text.count(study.MARK_BEGIN) == 1 and "- a scale note" in text
    assert "| InfoNCE, in-batch | hybrid (α=0.5) | 2 |" in text and "**multi MRR** (XQuAD-R" in text
    assert "| per seed |" in text
    assert json.loads((docs / "summary.json").read_text())["models"]["ngram"]["model_name"] == "ngram-512"


def test_a_study_run_is_a_train_run(study, random_bert_path, shared_data, tmp_path):
    """No second training loop: a study run and `mlret.train.train` with the same config take the same steps on
    the same batches (both are mlret.loop.run_loop), so every step's loss is the same; the study run gets the
    metric writer too."""
    import jax

    from mlret.config import load_config_file, validate
    from mlret.metrics_log import read_metrics
    from mlret.train import train

    c = load_config_file(REPO / "configs" / "smoke.py")
    c.model.name = str(random_bert_path)
    c.data.data_dir, c.data.tfds_dir = str(shared_data), str(tmp_path / "tfds")
    c.data.global_batch, c.data.query_len, c.data.passage_len = 8, 16, 32
    c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 1
    c.mesh.data, c.mesh.simulated_cpu_devices = 8, 0
    c.train.steps, c.train.log_every = 4, 1
    c.eval.evaluators, c.eval.xquad_r.languages = "xquad_r", "en"
    c.checkpoint.every = 0
    validate(c, devices=jax.device_count(), processes=1)
    ref = train(c, tmp_path / "train")
    _, record = study.ModelRunner("tiny", c).train(c.data.alpha, c.seed, tmp_path / "study")
    assert sorted(ref.losses) == [1, 2, 3, 4]
    assert record["losses"] == [ref.losses[s] for s in range(1, 5)]
    assert len(set(record["losses"])) == 4 and record["nonfinite_total"] == 0
    logged = {r["step"]: r for r in read_metrics(tmp_path / "study")}
    assert [logged[s]["loss"] for s in range(1, 5)] == record["losses"]
    assert [logged[s]["batch_type"] for s in range(1, 5)] == record["batch_types"]
