"""The offline study: does hybrid batch training beat X-X-mono and X-Y here, and does it reduce language bias?

    python scripts/study.py --out runs/study                 # all runs (resumable), then the report
    python scripts/study.py --out runs/study --report_only   # the report from the finished runs
    python scripts/study.py --out runs/pilot --models me5 --alphas 0,1 --seeds 0 --no_report

For each starting model (configs/study.py:me5 and :minilm) it evaluates the untrained model (the zero-shot
row), then trains one run per (alpha, seed) on MLQA-R units and evaluates it zero-shot on XQuAD-R (mono, cross,
multilingual, language bias) and Tatoeba. Each run writes `OUT/<model>/<run>.json` (summary metrics, per-query
values, losses, timings); a run whose file exists is skipped, so an interrupted study resumes where it stopped.
Progress lines give the elapsed time and an ETA.

The runs of a model share one process, one compiled train step and one set of compiled encoders: the study
calls the components `python -m mlret.train` is built from (mlret.step.Trainer, the Grain iterator of
mlret.data, mlret.eval's evaluators) with a fresh train state and data iterator per run, and no checkpoints
(a run is minutes long; resuming happens at the run level). alpha and the seed only change the data schedule,
so one compiled step serves every run of a model.

The report (`--docs`, default docs/study) holds summary.json, heatmaps and the markdown section that replaces
the text between the study markers of docs/results.md: mean +- std over seeds per setting, and a paired test
of hybrid (alpha = 0.5) against each baseline (alpha = 1, alpha = 0). The test pairs over XQuAD-R *questions*
(a question id and its 11 translations form one unit, since translations are not independent): per-query
values are averaged over the seeds, then over the question's languages; the statistic is the mean difference,
with a 95% bootstrap interval and a two-sided sign-flip permutation p-value (numpy only), Holm-adjusted within
each model. Tatoeba pairs over sentence pairs (both directions averaged). The seeds' spread is reported next to
it: the question-level test measures how consistently one arm beats the other across questions, not how much
a retrained model would vary (3 seeds cannot carry a test of their own).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_model  # noqa: E402


def define_flags() -> dict[str, Any]:
    """The command line (defined only when run as a script, so that tests can import this module next to other
    absl programs without duplicate flags)."""
    return {
        "out": flags.DEFINE_string("out", "runs/study", "where the per-run JSON files go (one folder per model)"),
        "models": flags.DEFINE_list("models", ["me5", "minilm"], "starting models (configs/study.py arguments)"),
        "alphas": flags.DEFINE_list("alphas", ["0.5", "1", "0", "0.25", "0.75"], "alpha values, in run order"),
        "minilm_alphas": flags.DEFINE_list("minilm_alphas", ["0.5", "1", "0"],
                                           "alpha values for the minilm start (the weaker start: the three arms)"),
        "seeds": flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (the data schedule's PRNG)"),
        "set": flags.DEFINE_multi_string("set", [], "config override field=value for every run (e.g. "
                                                    "train.steps=20)"),
        "report_only": flags.DEFINE_bool("report_only", False, "write the report from finished runs; train nothing"),
        "no_report": flags.DEFINE_bool("no_report", False, "run, but do not write the report"),
        "docs": flags.DEFINE_string("docs", str(REPO / "docs" / "study"), "report folder (summary.json, PNG files,"
                                                                             " section.md)"),
        "results_md": flags.DEFINE_string("results_md", str(REPO / "docs" / "results.md"),
                                          "the markdown file whose study section is replaced ('' to skip)"),
        "resamples": flags.DEFINE_integer("resamples", 20000, "bootstrap / permutation resamples"),
    }


FLAGS: dict[str, Any] = {}

log = logging.getLogger("study")

HYBRID, MONO, XY = 0.5, 1.0, 0.0
MARK_BEGIN = "<!-- study:begin (written by scripts/study.py; edit the script, not this section) -->"
MARK_END = "<!-- study:end -->"
# Summary metrics of the report: (evaluator, key, label, higher is better).
METRICS = [
    ("xquad_r", "mono_map", "mono mAP", True),
    ("xquad_r", "mono_r1", "mono R@1", True),
    ("xquad_r", "cross_map", "cross mAP", True),
    ("xquad_r", "cross_r1", "cross R@1", True),
    ("xquad_r", "multi_map", "multi mAP", True),
    ("xquad_r", "multi_r10", "multi R@10", True),
    ("xquad_r", "rank_distance", "lang. bias (rank dist.)", False),
    ("tatoeba", "acc", "Tatoeba acc", True),
]
# Per-query values tested (name in the run file, label, higher is better).
TESTED = [
    ("mono_map", "mono mAP", True),
    ("cross_map", "cross mAP", True),
    ("multi_map", "multi mAP", True),
    ("multi_r10", "multi R@10", True),
    ("rank_distance", "lang. bias", False),
    ("tatoeba_acc", "Tatoeba acc", True),
]


# ------------------------------------------------------------------------------------------------ configs


def load_config(model_key: str, overrides: Sequence[str]) -> Any:
    """configs/study.py:<model_key> with `field=value` overrides (the value parsed as the field's type)."""
    from mlret.config import ConfigError, apply_overrides, load_config_file

    config = load_config_file(REPO / "configs" / "study.py", model_key)
    try:
        apply_overrides(config, overrides)
    except ConfigError as e:
        raise app.UsageError(f"--set {e}") from None
    return config


def run_name(alpha: float, seed: int) -> str:
    return f"alpha{alpha:g}_seed{seed}"


# ------------------------------------------------------------------------------------------------ per-query


class RecordingEmbedder:
    """Passes calls to the real embedder and keeps what it returned (for per-query metrics)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, np.ndarray]] = []

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        out = self.inner.queries(texts)
        self.calls.append(("query", np.asarray(out)))
        return out

    def passages(self, texts: Sequence[str]) -> np.ndarray:
        out = self.inner.passages(texts)
        self.calls.append(("passage", np.asarray(out)))
        return out


def lareqa_per_query(evaluator: Any, calls: list[tuple[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per query ('<lang>:<question id>'): mono AP, cross AP (mean over target languages), multi AP, multi R@10,
    rank distance; from the embeddings the LAReQA evaluator computed (one query call, one passage call)."""
    from mlret.eval import metrics as M
    from mlret.eval.retrieval import relevant_ranks

    (kq, q_all), (kp, c_all) = calls
    assert kq == "query" and kp == "passage", [k for k, _ in calls]
    langs = evaluator.langs
    order = list(langs)
    q_emb, c_emb, offset = {}, {}, {}
    qo = co = 0
    for x in order:
        nq, nc = len(langs[x].questions), len(langs[x].sentences)
        q_emb[x], c_emb[x], offset[x] = q_all[qo:qo + nq], c_all[co:co + nc], co
        qo, co = qo + nq, co + nc
    golds = {x: langs[x].gold_by_id() for x in order}
    out: dict[str, dict[str, float]] = {k: {} for k in ("mono_map", "cross_map", "multi_map", "multi_r10",
                                                         "rank_distance")}
    for x in order:
        qids = langs[x].question_ids
        keys = [f"{x}:{q}" for q in qids]
        ranks = relevant_ranks(q_emb[x], c_emb[x], [[golds[x][q]] for q in qids])
        for k, v in zip(keys, M.average_precision(ranks, np.ones(len(qids)))):
            out["mono_map"][k] = float(v)
        cross_sum, cross_n = np.zeros(len(qids)), np.zeros(len(qids))
        for y in order:
            if y == x:
                continue
            keep = [i for i, q in enumerate(qids) if q in golds[y]]
            if not keep:
                continue
            ranks = relevant_ranks(q_emb[x][keep], c_emb[y], [[golds[y][qids[i]]] for i in keep])
            cross_sum[keep] += M.average_precision(ranks, np.ones(len(keep)))
            cross_n[keep] += 1
        for i, k in enumerate(keys):
            if cross_n[i]:
                out["cross_map"][k] = float(cross_sum[i] / cross_n[i])
        rel = [[offset[y] + golds[y][q] for y in order if q in golds[y]] for q in qids]
        n_rel = np.array([len(r) for r in rel], dtype=np.float64)
        ranks = relevant_ranks(q_emb[x], c_all, rel)
        for name, values in (("multi_map", M.average_precision(ranks, n_rel)),
                             ("multi_r10", M.recall_at_k(ranks, n_rel, 10)),
                             ("rank_distance", M.rank_distance(ranks))):
            for k, v in zip(keys, values):
                out[name][k] = float(v)
    return out


def tatoeba_per_query(evaluator: Any, calls: list[tuple[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per sentence pair ('<lang>:<line>'): mean of the xx->en and en->xx hits (1: nearest is the translation)."""
    from mlret.eval.retrieval import ExactIndex
    from mlret.eval.tatoeba import read_pair

    (_, emb), = calls
    acc: dict[str, float] = {}
    o = 0

    def norm(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    for lang in evaluator.languages:
        xx, _ = read_pair(evaluator.data_dir, lang, evaluator.max_sentences)
        n = len(xx)
        e_xx, e_en = norm(emb[o:o + n]), norm(emb[o + n:o + 2 * n])
        o += 2 * n
        hit_a = ExactIndex(e_en).search(e_xx, 1).indices[:, 0] == np.arange(n)
        hit_b = ExactIndex(e_xx).search(e_en, 1).indices[:, 0] == np.arange(n)
        for i in range(n):
            acc[f"{lang}:{i}"] = (float(hit_a[i]) + float(hit_b[i])) / 2
    return {"tatoeba_acc": acc}


# ------------------------------------------------------------------------------------------------ runner


class ModelRunner:
    """One starting model: loaded once, one Trainer (one compiled step), one set of evaluators."""

    def __init__(self, model_key: str, config: Any) -> None:
        from mlret import parallel
        from mlret.config import validate
        from mlret.data.pipeline import load_sources
        from mlret.eval import build_evaluators
        from mlret.eval.encode import eval_tokenizer
        from mlret.models import load_dual_encoder, resolve_model_dir
        from mlret.step import Trainer

        validate(config)
        self.key = model_key
        self.config = config
        t0 = time.perf_counter()
        self.mesh = parallel.make_mesh(config.mesh)
        model, self.tokenizer = load_dual_encoder(config)
        self.trainer = Trainer.create(model, config, self.mesh)
        del model
        self.eval_tokenizer = eval_tokenizer(config, str(resolve_model_dir(config.model.name)))
        self.evaluators = build_evaluators(config)
        self.sources = load_sources(config)
        log.info("%s: loaded %s in %.1f s", model_key, config.model.name, time.perf_counter() - t0)

    def evaluate(self, params: Any, step: int) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
        """(results by evaluator, per-query values) of the model with `params`."""
        from flax import nnx

        from mlret.eval import run_evaluators
        from mlret.eval.encode import make_embedder

        model = nnx.merge(self.trainer.graphdef, params, self.trainer.rest)
        embedder = make_embedder(model, self.config, self.mesh, self.eval_tokenizer)
        results: dict[str, Any] = {}
        per_query: dict[str, dict[str, float]] = {}
        for ev in self.evaluators:
            rec = RecordingEmbedder(embedder)
            block = run_evaluators([ev], rec, step)[ev.name]
            results[ev.name] = block
            if ev.name in ("xquad_r", "mlqa_r"):
                per_query.update(lareqa_per_query(ev, rec.calls))
            elif ev.name == "tatoeba":
                per_query.update(tatoeba_per_query(ev, rec.calls))
        return results, per_query

    def train(self, alpha: float, seed: int) -> tuple[Any, dict[str, Any]]:
        """Train one run from the loaded weights; returns (final params, training record)."""
        import jax

        from mlret.data.pipeline import make_train_iterator

        config = copy.deepcopy(self.config)
        config.data.alpha = float(alpha)
        config.seed = int(seed)
        data = make_train_iterator(config, self.tokenizer, process_index=0, process_count=1, sources=self.sources)
        state = self.trainer.init_state()
        losses, types = [], []
        t0, c0 = time.perf_counter(), time.process_time()
        total = int(config.train.steps)
        for step in range(1, total + 1):
            local = next(data)
            types.append("mono" if int(local["batch_type"][0]) == 0 else "cross")
            state, metrics = self.trainer.step(state, self.trainer.global_batch(local))
            losses.append(float(jax.device_get(metrics["loss"])))
            if step % int(config.train.log_every) == 0 or step == total:
                took = time.perf_counter() - t0
                print(f"  {self.key} alpha={alpha:g} seed={seed}: step {step}/{total} loss {np.mean(losses[-10:]):.4f} "
                      f"({took / step:.1f} s/step, {fmt_seconds(took / step * (total - step))} left)", flush=True)
        if self.trainer.trace_count != 1:
            raise RuntimeError(f"the train step was compiled {self.trainer.trace_count} times; expected once")
        record = {"losses": losses, "batch_types": types, "train_seconds": time.perf_counter() - t0,
                  "train_cpu_seconds": time.process_time() - c0,
                  "nonfinite_total": int(jax.device_get(state["nonfinite_total"]))}
        return state["params"]["model"], record


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=float))
    os.replace(tmp, path)  # atomic: a killed study never leaves a half-written run behind


def strip_results(results: dict[str, Any]) -> dict[str, Any]:
    """The evaluator blocks without bulky or non-JSON parts (keep summaries and per-language tables)."""
    keep = ("summary", "mono", "cross", "multi", "languages", "queries", "candidates", "candidates_total",
            "options", "seconds")
    return {name: {k: v for k, v in block.items() if k in keep} for name, block in results.items()}


def plan_runs(models: Sequence[str], alphas: Sequence[str], minilm_alphas: Sequence[str],
              seeds: Sequence[str]) -> list[tuple[str, float | None, int | None]]:
    """(model, alpha, seed) in run order; alpha None = the zero-shot row. Seed-major, so that a partial study
    already holds all three arms of the first seeds."""
    runs: list[tuple[str, float | None, int | None]] = []
    for m in models:
        runs.append((m, None, None))
        for s in seeds:
            runs += [(m, float(a), int(s)) for a in (minilm_alphas if m == "minilm" else alphas)]
    return runs


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_study(out: Path, runs: list[tuple[str, float | None, int | None]], overrides: Sequence[str]) -> None:
    todo = [r for r in runs if not (out / r[0] / (
        "zero_shot.json" if r[1] is None else f"{run_name(r[1], r[2])}.json")).exists()]
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to go -> {out}", flush=True)
    start = time.perf_counter()
    done = 0
    runner: ModelRunner | None = None
    for model_key, alpha, seed in todo:
        if runner is None or runner.key != model_key:
            runner = None  # free the previous model before loading the next
            runner = ModelRunner(model_key, load_config(model_key, overrides))
        name = "zero_shot" if alpha is None else run_name(alpha, seed)
        t0 = time.perf_counter()
        if alpha is None:
            params, record = runner.trainer.initial_params["model"], {"losses": [], "train_seconds": 0.0}
        else:
            params, record = runner.train(alpha, seed)
        t1 = time.perf_counter()
        results, per_query = runner.evaluate(params, 0 if alpha is None else int(runner.config.train.steps))
        record.update({
            "model": model_key, "model_name": runner.config.model.name, "alpha": alpha, "seed": seed,
            "eval_seconds": time.perf_counter() - t1, "results": strip_results(results), "per_query": per_query,
            "config": runner.config.to_dict(), "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        })
        write_json(out / model_key / f"{name}.json", record)
        done += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (len(todo) - done)
        summ = results.get("xquad_r", {}).get("summary", {})
        print(f"[{done}/{len(todo)}] {model_key} {name}: train {record['train_seconds']:.0f}s eval "
              f"{record['eval_seconds']:.0f}s | multi_map={summ.get('multi_map', float('nan')):.4f} "
              f"rank_distance={summ.get('rank_distance', float('nan')):.1f} "
              f"tatoeba_acc={results.get('tatoeba', {}).get('summary', {}).get('acc', float('nan')):.4f} | "
              f"elapsed {fmt_seconds(elapsed)}, ETA {fmt_seconds(eta)} (since {fmt_seconds(time.perf_counter() - t0)}"
              " for this run)", flush=True)


# ------------------------------------------------------------------------------------------------ statistics


def paired_test(a: np.ndarray, b: np.ndarray, resamples: int, rng: np.random.Generator) -> dict[str, float]:
    """Mean of a - b over paired units, its 95% bootstrap interval and a two-sided sign-flip permutation p."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = len(d)
    mean = float(d.mean())
    boot = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    flips = rng.choice(np.array([-1.0, 1.0]), size=(resamples, n))
    null = (flips * np.abs(d)).mean(axis=1)
    # The +1 counts the observed assignment, so p is never exactly 0 (Phipson & Smyth 2010).
    p = (1 + np.sum(np.abs(null) >= abs(mean) - 1e-12)) / (resamples + 1)
    return {"mean_diff": mean, "ci_low": float(np.percentile(boot, 2.5)), "ci_high": float(np.percentile(boot, 97.5)),
            "p": float(p), "n": n, "wins": int(np.sum(d > 0)), "losses": int(np.sum(d < 0))}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    m = len(pvalues)
    order = np.argsort(pvalues)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted.tolist()


def cluster_means(per_query: dict[str, float], by_id: bool) -> dict[str, float]:
    """'<lang>:<id>' values -> mean per unit. XQuAD-R (by_id): a question id and its translations form one unit;
    Tatoeba: every '<lang>:<line>' is its own unit (lines of different languages are different sentences)."""
    sums: dict[str, list[float]] = {}
    for key, v in per_query.items():
        sums.setdefault(key.partition(":")[2] if by_id else key, []).append(v)
    return {k: float(np.mean(v)) for k, v in sums.items()}


def seed_mean_per_query(runs: list[dict[str, Any]], metric: str) -> dict[str, float]:
    keys = set.intersection(*(set(r["per_query"][metric]) for r in runs))
    return {k: float(np.mean([r["per_query"][metric][k] for r in runs])) for k in sorted(keys)}


# ------------------------------------------------------------------------------------------------ report


def load_runs(out: Path) -> dict[str, dict[str, Any]]:
    """{model: {"zero_shot": run, "runs": {alpha: [runs by seed]}}} from the finished files."""
    found: dict[str, dict[str, Any]] = {}
    for model_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        entry: dict[str, Any] = {"zero_shot": None, "runs": {}}
        for f in sorted(model_dir.glob("*.json")):
            run = json.loads(f.read_text())
            if run["alpha"] is None:
                entry["zero_shot"] = run
            else:
                entry["runs"].setdefault(float(run["alpha"]), []).append(run)
        for alpha in entry["runs"]:
            entry["runs"][alpha].sort(key=lambda r: r["seed"])
        found[model_dir.name] = entry
    return found


def summary_value(run: dict[str, Any], evaluator: str, key: str) -> float:
    return float(run["results"].get(evaluator, {}).get("summary", {}).get(key, float("nan")))


def alpha_label(alpha: float) -> str:
    return {1.0: "X-X-mono (α=1)", 0.0: "X-Y (α=0)", 0.5: "hybrid (α=0.5)"}.get(alpha, f"α={alpha:g}")


def build_report(out: Path, docs: Path, resamples: int) -> dict[str, Any]:
    from mlret.eval.base import heatmap
    from mlret.eval.lareqa import pair_matrix

    data = load_runs(out)
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {"models": {}}
    docs.mkdir(parents=True, exist_ok=True)
    for model, entry in data.items():
        m_rep: dict[str, Any] = {"rows": [], "tests": [], "model_name": None}
        zs = entry["zero_shot"]
        if zs is not None:
            m_rep["model_name"] = zs["model_name"]
            m_rep["rows"].append({"setting": "zero-shot", "alpha": None, "seeds": 0,
                                  "metrics": {k: [summary_value(zs, e, k), 0.0] for e, k, _, _ in METRICS}})
        for alpha in sorted(entry["runs"], key=lambda a: -a):  # X-X-mono (α=1) first, X-Y (α=0) last
            runs = entry["runs"][alpha]
            m_rep["model_name"] = m_rep["model_name"] or runs[0]["model_name"]
            row = {"setting": alpha_label(alpha), "alpha": alpha, "seeds": len(runs), "metrics": {},
                   "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
                   "eval_seconds": float(np.mean([r["eval_seconds"] for r in runs])),
                   "final_loss": float(np.mean([np.mean(r["losses"][-10:]) for r in runs])),
                   "first_loss": float(np.mean([np.mean(r["losses"][:10]) for r in runs]))}
            for e, k, _, _ in METRICS:
                vals = np.array([summary_value(r, e, k) for r in runs])
                row["metrics"][k] = [float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0]
            m_rep["rows"].append(row)
        # Paired tests: hybrid vs each baseline, over the seeds both arms share.
        tests = []
        if HYBRID in entry["runs"]:
            for base in (MONO, XY):
                if base not in entry["runs"]:
                    continue
                seeds = sorted({r["seed"] for r in entry["runs"][HYBRID]} & {r["seed"] for r in entry["runs"][base]})
                h = [r for r in entry["runs"][HYBRID] if r["seed"] in seeds]
                b = [r for r in entry["runs"][base] if r["seed"] in seeds]
                for metric, label, higher in TESTED:
                    if not all(metric in r["per_query"] for r in h + b):
                        continue
                    by_id = not metric.startswith("tatoeba")
                    ch = cluster_means(seed_mean_per_query(h, metric), by_id)
                    cb = cluster_means(seed_mean_per_query(b, metric), by_id)
                    units = sorted(set(ch) & set(cb))
                    t = paired_test(np.array([ch[u] for u in units]), np.array([cb[u] for u in units]), resamples,
                                    rng)
                    t.update({"baseline": alpha_label(base), "metric": metric, "label": label,
                              "higher_is_better": higher, "seeds": seeds,
                              "unit": "sentence pair" if metric.startswith("tatoeba") else "XQuAD-R question"})
                    tests.append(t)
            for t, p_adj in zip(tests, holm([t["p"] for t in tests])):
                t["p_holm"] = p_adj
        m_rep["tests"] = tests
        m_rep["figures"] = draw_figures(model, entry, docs, heatmap, pair_matrix)
        report["models"][model] = m_rep
    write_json(docs / "summary.json", report)
    return report


def mean_matrix(runs: list[dict[str, Any]], pair_matrix: Any, metric: str = "map") -> tuple[np.ndarray, list[str]]:
    mats = [pair_matrix(r["results"]["xquad_r"], metric) for r in runs]
    return np.mean(mats, axis=0), runs[0]["results"]["xquad_r"]["languages"]


def draw_figures(model: str, entry: dict[str, Any], docs: Path, heatmap: Any, pair_matrix: Any) -> list[str]:
    """Pair-mAP heatmaps per arm, hybrid-minus-baseline differences, language bias per query language, and
    the alpha sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    runs = entry["runs"]
    if not runs or any("xquad_r" not in r["results"] for rs in runs.values() for r in rs):
        return files
    arms = {a: mean_matrix(rs, pair_matrix) for a, rs in runs.items()}
    if entry["zero_shot"] is not None:
        arms["zero-shot"] = mean_matrix([entry["zero_shot"]], pair_matrix)
    for a in (MONO, XY, HYBRID, "zero-shot"):
        if a not in arms:
            continue
        m, langs = arms[a]
        name = "zero_shot" if a == "zero-shot" else f"alpha{a:g}"
        path = docs / f"{model}_pairs_map_{name}.png"
        heatmap(str(path), m, langs, langs, f"{model}, {a if a == 'zero-shot' else alpha_label(a)}: XQuAD-R mAP"
                "\nrows: query language, columns: candidate language (subset, mean over seeds)",
                xlabel="candidate language", ylabel="query language")
        files.append(path.name)
    for base in (MONO, XY):
        if HYBRID in arms and base in arms:
            d = arms[HYBRID][0] - arms[base][0]
            lim = max(0.01, float(np.nanmax(np.abs(d))))
            path = docs / f"{model}_pairs_map_hybrid_minus_alpha{base:g}.png"
            heatmap(str(path), d, arms[HYBRID][1], arms[HYBRID][1],
                    f"{model}: XQuAD-R mAP, hybrid minus {alpha_label(base)}\n(positive: hybrid better)",
                    xlabel="candidate language", ylabel="query language", fmt="{:+.3f}", vmin=-lim, vmax=lim)
            files.append(path.name)
    # Language bias per query language: rows = arms, columns = languages.
    rows, mat = [], []
    order = [a for a in ("zero-shot", MONO, 0.75, HYBRID, 0.25, XY) if a == "zero-shot" or a in runs]
    for a in order:
        rs = [entry["zero_shot"]] if a == "zero-shot" else runs[a]
        if a == "zero-shot" and entry["zero_shot"] is None:
            continue
        langs = rs[0]["results"]["xquad_r"]["languages"]
        mat.append([np.mean([r["results"]["xquad_r"]["multi"][x]["rank_distance"] for r in rs]) for x in langs])
        rows.append("zero-shot" if a == "zero-shot" else f"α={a:g}")
    if mat:
        path = docs / f"{model}_language_bias.png"
        heatmap(str(path), np.array(mat), rows, langs, f"{model}: language bias (rank distance, multilingual pool;"
                " lower is better)", xlabel="query language", fmt="{:.0f}", vmin=None, vmax=None)
        files.append(path.name)
    # The alpha sweep.
    alphas = sorted(runs)
    if len(alphas) >= 2:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for ax, (key, label) in zip(axes, (("multi_map", "multi mAP"), ("cross_map", "cross mAP"),
                                          ("rank_distance", "language bias (rank distance)"))):
            mean = [np.mean([summary_value(r, "xquad_r", key) for r in runs[a]]) for a in alphas]
            std = [np.std([summary_value(r, "xquad_r", key) for r in runs[a]], ddof=1) if len(runs[a]) > 1 else 0
                   for a in alphas]
            ax.errorbar(alphas, mean, yerr=std, marker="o", capsize=3, label="trained (mean ± std over seeds)")
            if entry["zero_shot"] is not None:
                ax.axhline(summary_value(entry["zero_shot"], "xquad_r", key), color="gray", ls="--",
                           label="zero-shot")
            ax.set_xlabel("α (probability of a monolingual batch)")
            ax.set_title(label, fontsize=10)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{model}: XQuAD-R (subset) against α", fontsize=10)
        fig.tight_layout()
        path = docs / f"{model}_alpha_sweep.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def markdown(report: dict[str, Any], out: Path, docs: Path, results_md: Path | None) -> str:
    """The docs/results.md section: setup, commands, tables, tests, figures."""
    rel = os.path.relpath(docs, results_md.parent) if results_md else str(docs)
    any_run = next((r for m in load_runs(out).values() for rs in m["runs"].values() for r in rs), None)
    cfg = any_run["config"] if any_run else None
    lines = [MARK_BEGIN, "", "## Offline study: hybrid batches against X-X-mono and X-Y (this CPU)", ""]
    if cfg:
        d, o, ev = cfg["data"], cfg["optim"], cfg["eval"]
        lines += [
            "Setup, scaled down to the 2-core CPU of this machine (every reduction is listed; `configs/paper.py` "
            "holds the full-size experiment):",
            "",
            "- Training data: MLQA-R units (7 languages: ar de en es hi vi zh), the offline stand-in for the paper's "
            "translated QA data. Evaluation is zero-shot on XQuAD-R (11 languages; el, ru, th, tr unseen in "
            "training) and Tatoeba.",
            f"- Batch {d['global_batch']} pairs (paper: 100), 1 hard negative each (the paragraph's nearest other "
            f"sentence); query length {d['query_len']}, passage length {d['passage_len']} in training.",
            f"- {cfg['train']['steps']} steps per run (paper: epochs), AdamW lr {o['learning_rate']:g} (paper: "
            f"3e-5; raised because so few steps at 3e-5 barely move the model), weight decay {o['weight_decay']:g},"
            f" {o['warmup_steps']} warm-up steps then linear decay to 0, τ = {cfg['loss']['temperature']:g}, "
            "cosine similarity, in-batch negatives.",
            f"- XQuAD-R subset: the first {ev['xquad_r']['max_paragraphs']} paragraphs of every language (all 11 "
            f"languages, all settings: mono, cross, multilingual with language bias), candidates are sentences "
            f"alone; eval lengths query {ev['query_len']}, passage {ev['passage_len']}.",
            f"- Tatoeba subset: the first {ev['tatoeba']['max_sentences']} sentence pairs of each of "
            f"{len(ev['tatoeba']['languages'].split(','))} languages ({ev['tatoeba']['languages']}), "
            "xx→en and en→xx accuracy.",
            "- Seeds 0, 1, 2 change the data schedule (batch types, languages, units); every run starts from the "
            "same weights.",
            "",
        ]
    lines += [
        "Commands (the second one only rewrites this section and the figures from the finished runs):",
        "",
        "```bash",
        f"python scripts/study.py --out {out}",
        f"python scripts/study.py --out {out} --report_only",
        "```",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores shared with other jobs, one jax CPU device, jax "
        f"{_version('jax')}, flax {_version('flax')}. " + _time_span(out),
        "",
    ]
    for model, m in report["models"].items():
        lines += [f"### Start: {model} (`{m['model_name']}`)", ""]
        header = "| setting | seeds | " + " | ".join(label for _, _, label, _ in METRICS) + " |"
        lines += [header, "|" + "---|" * (len(METRICS) + 2)]
        for row in m["rows"]:
            cells = []
            for _, k, _, _ in METRICS:
                mean, std = row["metrics"][k]
                if math.isnan(mean):
                    cells.append("–")
                elif k == "rank_distance":
                    cells.append(f"{mean:.1f}" + (f" ± {std:.1f}" if row["seeds"] > 1 else ""))
                else:
                    cells.append(f"{mean:.4f}" + (f" ± {std:.4f}" if row["seeds"] > 1 else ""))
            lines.append(f"| {row['setting']} | {row['seeds'] or '–'} | " + " | ".join(cells) + " |")
        trained = [r for r in m["rows"] if r["seeds"]]
        if trained:
            lines += ["", "Mean loss of the first / last 10 steps, and wall seconds per run (train / eval; the "
                          "machine was shared, so these vary with its load): " + "; ".join(
                f"{r['setting']}: {r['first_loss']:.3f} → {r['final_loss']:.3f}, {r['train_seconds']:.0f} s / "
                f"{r['eval_seconds']:.0f} s" for r in trained) + "."]
        if m["tests"]:
            lines += ["", "Paired tests, hybrid (α=0.5) minus baseline (per-query values averaged over the shared "
                          "seeds, then per unit; two-sided sign-flip permutation test, Holm-adjusted over this "
                          "model's tests; language bias: negative is better):", "",
                      "| baseline | metric | unit (n) | hybrid − baseline [95% CI] | hybrid better / worse | p | "
                      "p (Holm) |", "|---|---|---|---|---|---|---|"]
            for t in m["tests"]:
                better, worse = (t["wins"], t["losses"]) if t["higher_is_better"] else (t["losses"], t["wins"])
                lines.append(f"| {t['baseline']} | {t['label']} | {t['unit']} ({t['n']}) | {t['mean_diff']:+.4f} "
                             f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] | {better} / {worse} | {fmt_p(t['p'])} | "
                             f"{fmt_p(t['p_holm'])} |")
        if m["figures"]:
            lines += ["", "Figures: " + ", ".join(f"[{f}]({rel}/{f})" for f in m["figures"]) + ".", ""]
            for f in m["figures"]:
                if "minus" in f or "sweep" in f or "bias" in f:
                    lines.append(f"![{f}]({rel}/{f})")
        lines.append("")
    lines += [MARK_END]
    return "\n".join(lines)


def fmt_p(p: float) -> str:
    return f"{p:.4f}" if p >= 0.001 else f"{p:.1e}"


def _time_span(out: Path) -> str:
    """When the runs finished and how much time they took (train + eval, summed over runs)."""
    runs = [r for m in load_runs(out).values() for r in ([m["zero_shot"]] if m["zero_shot"] else []) +
            [r for rs in m["runs"].values() for r in rs]]
    if not runs:
        return ""
    done = sorted(r["finished"] for r in runs if r.get("finished"))
    busy = sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in runs)
    cpu = sum(r.get("train_cpu_seconds", 0.0) for r in runs)
    when = f" finished between {done[0]} and {done[-1]}" if done else ""  # older run files carry no time stamp
    return (f"{len(runs)} runs{when}; together {busy / 60:.0f} min of wall time in training + evaluation "
            f"({cpu / 60:.0f} CPU-min in the train steps alone).")


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "?"


def update_results_md(path: Path, section: str) -> None:
    """Replace the study section between the markers (append it when absent); the rest of the file stays."""
    text = path.read_text() if path.exists() else "# Results\n"
    if MARK_BEGIN in text and MARK_END in text:
        head, _, rest = text.partition(MARK_BEGIN)
        _, _, tail = rest.partition(MARK_END)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    f = {k: v.value for k, v in FLAGS.items()}
    out = Path(f["out"])
    if not f["report_only"]:
        run_study(out, plan_runs(f["models"], f["alphas"], f["minilm_alphas"], f["seeds"]), f["set"])
    if f["no_report"]:
        return
    docs = Path(f["docs"])
    report = build_report(out, docs, f["resamples"])
    results_md = Path(f["results_md"]) if f["results_md"] else None
    section = markdown(report, out, docs, results_md)
    (docs / "section.md").write_text(section + "\n")
    if results_md is not None:
        update_results_md(results_md, section)
        print(f"study: report in {docs} and {results_md}", flush=True)
    else:
        print(f"study: report in {docs}", flush=True)


if __name__ == "__main__":
    FLAGS.update(define_flags())
    app.run(main)
