"""scripts/study.py without a model: its per-query values reproduce the evaluators' summaries, its paired test
and Holm adjustment behave, and the report (tables, tests, figures, results.md section) is built from run files;
and with the tiny model, its training runs through mlret's loop: the same losses as `mlret.train.train`.

The embedder is mlret.eval.base.NgramEmbedder (real, imperfect rankings of the real XQuAD-R / Tatoeba text)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
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
    sys.modules["study_script"] = module  # its dataclasses resolve their module by name
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


def test_holm(study):
    p = [0.01, 0.04, 0.03, 0.2]
    adjusted = study.holm(p)
    assert all(x >= y for x, y in zip(adjusted, p))
    order = np.argsort(p)
    assert all(adjusted[order[i]] <= adjusted[order[i + 1]] for i in range(len(p) - 1))  # monotone in p
    assert adjusted[order[0]] == pytest.approx(len(p) * min(p))


def test_exact_tests_match_scipy(study):
    """The exact sign-flip (blocked loss contrasts) and two-sample permutation (schedules between batchings) give
    scipy's exact permutation p-values, and their floors are what the report states (2/512 for 9 blocks, 0.1 for
    3 vs 3 schedules)."""
    from scipy import stats

    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1.0, size=9)
    ours = study.exact_sign_flip(d)
    ref = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                 alternative="two-sided")
    assert ours["arrangements"] == 512 and ours["p"] == pytest.approx(min(1.0, ref.pvalue))
    assert study.exact_sign_flip(np.abs(d) + 0.1)["p"] == pytest.approx(2 / 512)
    a, b = rng.normal(size=3), rng.normal(size=3)
    ours = study.exact_two_sample(a, b)
    ref = stats.permutation_test((a, b), lambda x, y: np.mean(x) - np.mean(y), permutation_type="independent",
                                 n_resamples=np.inf, alternative="two-sided")
    assert ours["arrangements"] == 20 and ours["p"] == pytest.approx(min(1.0, ref.pvalue))
    assert study.exact_two_sample([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])["p"] == pytest.approx(0.1)
    assert study.exact_two_sample([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])["p"] == 1.0


def test_hierarchical_bootstrap(study):
    """Seeds and articles resampled together: a shift far above both noise sources is found (a bound p, an
    interval around it); a shift inside the between-seed noise is not; the seed variance is not shrunk by 2/3."""
    rng = np.random.default_rng(0)
    K, n = 10, 3
    counts = rng.integers(5, 40, size=K).astype(float)
    article = rng.normal(0, 0.05, size=K)  # shared by every run: it cancels in a contrast

    def sums(gap, seed_sd):
        return np.stack([np.stack([counts * (0.6 + shift + article + rng.normal(0, seed_sd)) for _ in range(n)])
                         for shift in (gap, 0.0)])

    big = study.hierarchical_bootstrap(sums(0.05, 0.002), counts, np.array([1.0, -1.0]), [0, 1], 4000,
                                       np.random.default_rng(1))
    assert big["p_bound"] and big["p"] == pytest.approx(2 / 4001)
    assert 0 < big["ci_low"] < big["estimate"] < big["ci_high"] and big["estimate"] == pytest.approx(0.05, abs=0.01)
    small = study.hierarchical_bootstrap(sums(0.002, 0.02), counts, np.array([1.0, -1.0]), [0, 1], 4000,
                                         np.random.default_rng(1))
    assert small["p"] > 0.2 and not small["p_bound"]
    # Seed noise only: the bootstrap sd of one cell's mean ~ the seed sd / sqrt(n) (unbiased, not x sqrt(2/3)).
    s = np.stack([counts * (0.6 + rng.normal(0, 0.01, size=1)) for _ in range(n)])[None]
    seed_sd = np.std(s.sum(axis=2) / counts.sum(), ddof=1)
    draws = [study.hierarchical_bootstrap(s, counts, np.array([1.0]), [0], 2000, np.random.default_rng(k))
             for k in range(2)]
    width = np.mean([(d["ci_high"] - d["ci_low"]) / (2 * 1.96) for d in draws])
    assert width == pytest.approx(seed_sd / np.sqrt(n), rel=0.35)


def test_repair_provenance(study):
    """Run files written before the fix store the base config's alpha 0.5 and seed 0: the run's name wins."""
    run = {"alpha": 0.0, "seed": 2, "config": {"data": {"alpha": 0.5}, "seed": 0, "optim": {}, "loss": {}}}
    fixed = study.repair_provenance(copy.deepcopy(run), "eq1_alpha0_seed2")
    assert fixed["config"]["data"]["alpha"] == 0.0 and fixed["config"]["seed"] == 2 and len(fixed["provenance"]) == 2
    sweep = study.repair_provenance(copy.deepcopy(run), "eq1_alpha0_lr2e-05_tau0.01_seed2")
    assert sweep["config"]["optim"]["learning_rate"] == 2e-5 and sweep["config"]["loss"]["temperature"] == 0.01
    good = {"alpha": 1.0, "seed": 1, "config": {"data": {"alpha": 1.0}, "seed": 1}}
    assert "provenance" not in study.repair_provenance(good, "infonce_alpha1_seed1")
    with pytest.raises(ValueError, match="disagree"):
        study.repair_provenance(copy.deepcopy(run), "eq1_alpha1_seed2")
    assert study.parse_run_name("zero_shot") is None


def test_plan_is_seed_major_and_starts_with_zero_shot(study):
    runs = study.plan_runs(["me5", "minilm"], ["eq1", "infonce"], ["0.5", "1", "0"], ["0.5", "1"], ["0", "1"])
    runs = [r[:4] for r in runs]
    assert runs[0] == ("me5", None, None, None)
    assert runs[1:7] == [("me5", "eq1", 0.5, 0), ("me5", "eq1", 1.0, 0), ("me5", "eq1", 0.0, 0),
                         ("me5", "infonce", 0.5, 0), ("me5", "infonce", 1.0, 0), ("me5", "infonce", 0.0, 0)]
    assert runs[13] == ("minilm", None, None, None) and len(runs) == 1 + 12 + 1 + 8
    assert study.run_file(Path("o"), runs[1]) == Path("o/me5/eq1_alpha0.5_seed0.json.gz")
    cells = [r[:4] for r in study.plan_runs(["me5"], [], [], [], ["0", "1"], ["infonce:0.5", "eq1:0.5", "infonce:0"])]
    assert cells[1:] == [("me5", "infonce", 0.5, 0), ("me5", "eq1", 0.5, 0), ("me5", "infonce", 0.0, 0),
                         ("me5", "infonce", 0.5, 1), ("me5", "eq1", 0.5, 1), ("me5", "infonce", 0.0, 1)]


def test_loss_rows_are_configs_the_trainer_accepts(study):
    """Every loss row, on the CPU base and under the GPU preset, is a valid config with the loss it names."""
    from mlret import losses
    from mlret.config import load_config_module, validate

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
    """Fake runs (the n-gram results, shifted per cell, with a little noise per run) go through the whole report:
    Eq. 1 is 0.08 above InfoNCE (0.03 at hybrid), hybrid's gap to X-X-mono is 0.05 under InfoNCE and 0 under Eq. 1,
    so the loss test, the batching main effect and the interaction must each find what was put in."""
    results, per_query = ngram_results
    rng = np.random.default_rng(3)
    out = tmp_path / "runs"
    shifts = {(loss, alpha): base + (0.08 if loss == "eq1" else 0.0) + (gap if alpha == 0.5 else 0.0)
              for loss, gap in (("eq1", 0.0), ("infonce", 0.05)) for alpha, base in ((1.0, 0.0), (0.0, 0.02), (0.5, 0))}
    cells = [(None, None, 0.0)] + [(loss, alpha, shift) for (loss, alpha), shift in shifts.items()]
    for loss, alpha, shift in cells:
        for seed in ((None,) if alpha is None else (0, 1, 2)):
            noise = rng.normal(scale=0.002)
            pq = {m: {k: (v + shift + noise if m != "rank_distance" else v * (1 - shift)) for k, v in vals.items()}
                  for m, vals in per_query.items()}
            res = copy.deepcopy(results)
            res["xquad_r"]["summary"]["multi_mrr"] += shift
            run = {"model": "ngram", "model_name": "ngram-512", "loss": loss, "alpha": alpha, "seed": seed,
                   "losses": [2.0, 1.0], "train_seconds": 1.0, "eval_seconds": 1.0,
                   "batch_types": None if alpha is None else ["cross" if alpha < 1 and i % 2 else "mono"
                                                              for i in range(4)],
                   "results": study.strip_results(res), "per_query": pq,
                   "config": {"data": {"alpha": 0.5}, "seed": 0}}  # the base config, as before the provenance fix
            study.write_json(study.run_file(out, ("ngram", loss, alpha, seed)), run)
    docs = tmp_path / "docs"
    report = study.build_report(out, docs, 2000)
    m = report["models"]["ngram"]
    rows = {(r["loss"], r["setting"]): r for r in m["rows"]}
    assert len(rows) == 1 + 6 and rows[("infonce", "hybrid (α=0.5)")]["seeds"] == 3
    assert rows[("infonce", "hybrid (α=0.5)")]["metrics"]["multi_mrr"][0] == pytest.approx(
        results["xquad_r"]["summary"]["multi_mrr"] + 0.05)
    # Every trained run's config said alpha 0.5, seed 0: all but the two runs at alpha 0.5, seed 0 are repaired.
    assert m["repaired"] == 16
    fam = m["inference"]["families"]
    loss = study._find(fam["loss"], "mono_mrr")
    assert loss["estimate"] == pytest.approx((0.03 + 0.08 + 0.08) / 3, abs=0.002) and loss["same_sign"] == 9
    assert loss["exact"]["p"] == pytest.approx(2 / 512) and loss["p_primary"] == loss["exact"]["p"]
    main = study._find(fam["batching"], "mono_mrr", contrast="hybrid − X-X-mono (α=1)")
    assert main["estimate"] == pytest.approx(0.025, abs=0.003) and main["exact"]["p"] == pytest.approx(0.1)
    assert main["p_bound"] and main["p"] == pytest.approx(2 / 2001)
    inter = study._find(fam["interaction"], "mono_mrr", contrast="(hybrid − X-X-mono (α=1)) under Eq. 1 minus under "
                        "InfoNCE")
    assert inter["estimate"] == pytest.approx(-0.05, abs=0.003) and inter["p_holm"] < 0.05
    assert {len(fam[k]) for k in ("batching", "interaction")} == {12} and len(fam["batching_by_loss"]) == 24
    assert m["schedules"]["0.5"]["0"] == {"cross": 2, "steps": 4, "shared": True, "runs": 2}
    figures = m["figures"]
    assert all((docs / f).is_file() for f in figures) and any("two_way" in f for f in figures)
    assert any("gaps" in f for f in figures)
    results_md = tmp_path / "results.md"
    results_md.write_text("# Results\n\n## Zero-shot baseline\n\nkept text\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{study.README_BEGIN}\n{study.README_END}\n\n## Next\n")
    for _ in range(2):  # idempotent: the second write replaces the first section
        study.update_results_md(results_md, study.markdown(report, out, docs, results_md, ["a scale note"]))
        study.replace_between(readme, study.README_BEGIN, study.README_END, study.readme_answer(report, out))
    text = results_md.read_text()
    assert "kept text" in text and text.count(study.MARK_BEGIN) == 1 and "- a scale note" in text
    assert "| InfoNCE, in-batch | hybrid (α=0.5) | 3 |" in text and "**mono hit@1** (XQuAD-R" in text
    assert "**Table A.**" in text and "**Table B.**" in text and "**Table H.**" in text and "Provenance: 16" in text
    assert "| ≤ " in text  # a bound p is written as a bound, never as a value
    answer = readme.read_text()
    assert answer.count(study.README_BEGIN) == 1 and "## Next" in answer and "**Loss (Eq. 1" in answer
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


# ------------------------------------------------------------------------------------------------ issue 31 stages

MLQA_LANGS = ("ar", "de", "en", "es", "hi", "vi", "zh")


def test_mlqa_r_dev_split_holds_whole_articles(shared_data):
    """The dev split is whole MLQA-R articles: no dev question sits in a non-dev article of any language, the
    dev evaluation holds only dev questions with their own answer sentences, and a seed gives one split."""
    from mlret import splits
    from mlret.eval.lareqa import load

    d = str(shared_data / "mlqa-r")
    split = splits.mlqa_r_split(d, MLQA_LANGS, 100, 2026)
    assert split == splits.mlqa_r_split(d, MLQA_LANGS, 100, 2026)
    assert split.question_ids != splits.mlqa_r_split(d, MLQA_LANGS, 100, 7).question_ids
    en_ids = set(splits.paragraph_qids(f"{d}/en.json"))
    assert 100 <= len(split.question_ids & en_ids) < 130
    for lang in MLQA_LANGS:
        for (article, _), ids in splits.paragraph_questions(f"{d}/{lang}.json").items():
            inside = article in split.articles.get(lang, ())
            assert all((q in split.question_ids) == inside for q in ids), (lang, article)
    keep = split.paragraphs(d, MLQA_LANGS)
    full = load(d, MLQA_LANGS)
    for lang in ("en", "zh"):
        sub = splits.subset_language(full[lang], keep[lang])
        assert set(sub.question_ids) <= split.question_ids and len(sub.question_ids) > 0
        gold_full = dict(zip(full[lang].question_ids, full[lang].gold.tolist()))
        for q, g in zip(sub.question_ids, sub.gold.tolist()):
            assert sub.sentences[g] == full[lang].sentences[gold_full[q]]
            assert sub.keys[g] == full[lang].keys[gold_full[q]]


def test_training_drops_the_dev_units():
    from mlret import splits
    from mlret.data.pipeline import ListStore
    from mlret.data.units import LangText, ParallelUnit

    units = [ParallelUnit(f"q{i}", "mlqa_r", {"en": LangText(f"question {i}", f"answer {i}")}) for i in range(2500)]
    (name, store), = splits.filter_sources([("mlqa_r", ListStore(units))], frozenset({"q3", "q1500", "q2499"}))
    assert name == "mlqa_r" and len(store) == 2497
    kept = {u.id for u in store.get(range(len(store)))}
    assert not kept & {"q3", "q1500", "q2499"} and store.get([3])[0].id == "q4"


def test_stratified_xquad_slice(shared_data):
    from mlret import splits

    d = str(shared_data / "xquad-r")
    draw = splits.stratified_paragraphs(d, 50, 2026)
    assert draw == splits.stratified_paragraphs(d, 50, 2026) and draw != splits.stratified_paragraphs(d, 50, 1)
    per_article = np.bincount([a for a, _ in draw], minlength=48)
    assert len(draw) == 50 and len(per_article) == 48 and set(per_article.tolist()) == {1, 2}
    assert sorted(per_article.tolist()).count(2) == 2


def test_sweep_and_final_plans(study):
    from mlret.config import load_config_module

    cfg = load_config_module(REPO / "configs" / "study.py")
    sweep = study.plan_sweep(["me5", "minilm"], cfg.SWEEP)
    me5 = [r for r in sweep if r.model == "me5" and r.loss]
    assert sweep[0] == study.Run("me5", None, None, None) and len(me5) == 24 and len(sweep) == 1 + 24 + 1 + 12
    assert len({(r.lr, r.tau) for r in me5}) == 6 and {r.loss for r in me5} == {"eq1", "infonce"}
    name = study.run_file(Path("o"), me5[0]).name
    assert name == "eq1_alpha0.5_lr1e-05_tau0.01_seed0.json.gz"
    assert study.parse_run_name(name.split(".json")[0]) == {"loss": "eq1", "alpha": 0.5, "seed": 0, "lr": 1e-5,
                                                            "tau": 0.01}
    final = study.plan_runs(["me5"], [], [], [], [str(s) for s in cfg.FINAL["me5"]["seeds"]], cfg.FINAL["me5"]["cells"])
    assert len(final) == 1 + 36 and all(r.lr is None for r in final)
    assert len(study.plan_runs(["minilm"], [], [], [], ["0", "1", "2"], cfg.FINAL["minilm"]["cells"])) == 1 + 12


def test_select_settings_from_dev_curves(study, tmp_path):
    """Each loss's setting is the best mean dev criterion at the last step over its cells and seeds; the symmetric
    and VRN rows take InfoNCE's; missing runs are listed (the final stage refuses to start on them)."""
    from mlret.config import load_config_module

    cfg = load_config_module(REPO / "configs" / "study.py")
    best = {"eq1": (2e-5, 0.05), "infonce": (1e-5, 0.01)}
    for r in study.plan_sweep(["me5"], cfg.SWEEP):
        if r.loss is None:
            continue
        score = 0.7 if (r.lr, r.tau) == best[r.loss] else 0.6 - r.lr
        curve = {str(s): {k: score - (30 - s) * 0.001 for k in cfg.DEV_CRITERION} for s in cfg.DEV_EVAL_STEPS}
        if (r.loss, r.alpha, r.lr, r.tau) == ("infonce", 1.0, 5e-5, 0.05):
            continue  # one run missing
        study.write_json(study.run_file(tmp_path, r), {"dev": curve, "alpha": r.alpha, "seed": r.seed})
    sel = study.select_settings(tmp_path, cfg, ["me5"])["me5"]
    assert sel["chosen"]["eq1"] == best["eq1"] and sel["chosen"]["infonce"] == best["infonce"]
    assert sel["chosen"]["symmetric"] == sel["chosen"]["vrn"] == best["infonce"]
    assert sel["missing"] == ["infonce_alpha1_lr5e-05_tau0.05_seed0.json.gz"]
    assert sel["rows"][0]["curve"]["10"] < sel["rows"][0]["curve"]["30"]
    text = study.sweep_markdown({"me5": sel}, tmp_path)
    assert "| Eq. 1 as written | hybrid (α=0.5) | 1e-05 | 0.01 | 0 |" in text
    # The settings ranked by score: the chosen one first (margin 0), every other at or below it.
    lr, tau = best["eq1"]
    ranks = [line.split(" | ") for line in text.splitlines() if line.startswith("| Eq. 1 as written | ")
             and line.count("|") == 7]
    assert ranks[0][1:4] == ["1", f"{lr:g}", f"{tau:g}"] and ranks[0][5] == "+0.0000 |"
    assert len(ranks) == len({(r["lr"], r["tau"]) for r in sel["rows"] if r["loss"] == "eq1"})
    assert all(float(r[5].rstrip(" |")) <= 0 for r in ranks)
    # A later call for MiniLM alone reports both models: the me5 section and settings are not dropped.
    assert study.swept_models(tmp_path, cfg, ["minilm"]) == ["me5", "minilm"]
    assert study.swept_models(tmp_path, cfg, ["me5"]) == ["me5"]


def test_gpu_preset_trains_and_evaluates_on_disjoint_data(study, shared_data):
    """The GPU preset no longer evaluates MLQA-R on its training data: MLQA-R is evaluated on the held-out dev
    articles only, and those are dropped from training."""
    from mlret.config import load_config_module

    cfg = load_config_module(REPO / "configs" / "study.py")
    assert "mlqa_r" not in next(o for o in cfg.GPU_OVERRIDES if o.startswith("eval.evaluators="))
    stage = study.make_stage("gpu", cfg, str(shared_data))
    config = study.load_config("me5", list(cfg.GPU_OVERRIDES))
    (dev,) = stage.dev_evaluators(config)
    assert dev.name == "mlqa_r_dev" and [e.name for e in stage.evaluators(config, [])] == ["mlqa_r_dev"]
    evaluated = {q for lang in dev.langs.values() for q in lang.question_ids}
    assert evaluated and evaluated <= stage.drop_ids
    sweep = study.make_stage("sweep", cfg, str(shared_data))
    assert sweep.dev_only and sweep.dev_steps == tuple(cfg.DEV_EVAL_STEPS) and sweep.drop_ids == stage.drop_ids
    final = study.make_stage("final", cfg, str(shared_data))
    assert len(final.xquad_keep) == cfg.SLICE_PARAGRAPHS and final.dev_keep is not None and not final.dev_steps


def test_final_report_of_a_two_by_two_at_chosen_settings(study, ngram_results, tmp_path):
    """The final stage's report (runs that say stage "final", each loss at its own learning rate and temperature)
    of a 2 x 2 start (no X-Y runs, as MiniLM's): the answer names each loss's setting, cites only the baseline that
    ran, names the contrast of every test that holds, and its commands rerun the final stage."""
    results, per_query = ngram_results
    out = tmp_path / "final"
    settings = {"eq1": (2e-5, 0.05), "infonce": (5e-5, 0.01)}
    for loss, alpha in [(None, None)] + [(x, a) for x in settings for a in (1.0, 0.5)]:
        for seed in ((None,) if alpha is None else (0, 1, 2)):
            shift = 0.0 if alpha is None else (0.05 if alpha == 0.5 else 0.0) + 0.001 * seed
            pq = {m: {k: (v + shift if m != "rank_distance" else v * (1 - shift)) for k, v in vals.items()}
                  for m, vals in per_query.items()}
            lr, tau = settings.get(loss, (5e-5, 0.05))
            run = {"model": "ngram", "model_name": "/some/local/ngram", "loss": loss, "alpha": alpha, "seed": seed,
                   "stage": "final", "losses": [2.0, 1.0], "train_seconds": 1.0, "eval_seconds": 1.0,
                   "batch_types": None if alpha is None else ["cross" if alpha < 1 and i % 2 else "mono"
                                                              for i in range(4)],
                   "results": study.strip_results(copy.deepcopy(results)), "per_query": pq,
                   "config": {"data": {"alpha": alpha if alpha is not None else 0.5}, "seed": seed or 0,
                              "optim": {"learning_rate": lr}, "loss": {"temperature": tau}}}
            study.write_json(study.run_file(out, ("ngram", loss, alpha, seed)), run)
    report = study.build_report(out, tmp_path / "docs", 500)
    text = study.markdown(report, out, tmp_path / "docs", tmp_path / "results.md", ["a note"])
    answer = text.split("### How it was run")[0]
    assert "chosen on the held-out MLQA-R dev split (Eq. 1: 2e-05 / 0.05, InfoNCE: 5e-05 / 0.01)" in answer
    assert "Hybrid minus X-X-mono: mono MRR" in answer and "minus X-Y" not in answer
    assert "mono MRR against X-X-mono" in answer  # the 0.05 put into hybrid holds, named with its baseline
    assert "each at its best swept step size" in answer and "without a learning-rate sweep" not in answer
    assert "between the two baselines" not in answer  # no table H claim without both baselines
    assert "python scripts/study.py --stage final --models ngram --report_only" in text
    assert "/some/local" not in text  # a start model is named, not the folder of the machine that ran it
