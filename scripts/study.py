"""The offline study: what does the contrastive objective add to hybrid batch training, for monolingual,
cross-lingual and multilingual retrieval at once (MRR and exact-match acc@1)?

    python scripts/study.py --out docs/study/runs                 # all runs (resumable), then the report
    python scripts/study.py --out docs/study/runs --report_only   # the report from the finished runs
    python scripts/study.py --out runs/pilot --models me5 --losses infonce --alphas 0,1 --seeds 0 --no_report

The grid is loss x batching x seed: the loss rows of configs/study.py's LOSSES (Eq. 1 of 2408.10536 as
written, InfoNCE with in-batch negatives, + the symmetric form with within-view negatives, + VRN) against the
batching columns alpha = 1 (X-X-mono), 0 (X-Y) and 0.5 (hybrid). For each starting model (configs/study.py:me5,
optionally :minilm) it evaluates the untrained model (the zero-shot row), then trains one run per (loss, alpha,
seed) on MLQA-R units and evaluates it zero-shot on XQuAD-R (mono, cross, multilingual, language bias), Tatoeba
and the offline 11-example TyDi QA sample. Each run writes `OUT/<model>/<run>.json.gz` (summary metrics, per-query
values, losses, timings); a run whose file exists is skipped, so an interrupted study resumes where it stopped.
Progress lines give the elapsed time and an ETA.

The runs of a model share one process, one loaded model and one set of compiled encoders: the study trains
through mlret's own loop (`mlret.loop.run_loop` with the step of `mlret.step.build_train_step`, the Grain
iterator of mlret.data, the non-finite stop and the metric writer of `mlret.hooks`: each run's metrics.jsonl /
TensorBoard logs go to `OUT/<model>/logs/<run>/`) with a fresh train state and data iterator per run, and no
checkpoints (a run is minutes long; resuming happens at the run level). alpha and the seed only change the data
schedule, so one compiled step serves every run of a loss (one train step is alive at a time; the persistent
compilation cache makes switching back cheap). The per-query values of the paired tests are the evaluators' own
(`EvalResult.per_query`).

The report (`--docs`, default docs/study) holds summary.json, heatmaps and the markdown section that replaces
the text between the study markers of docs/results.md: mean +- std over seeds per setting, and a paired test
of hybrid (alpha = 0.5) against each baseline (alpha = 1, alpha = 0) under each loss, and an interaction test
(does the loss change those gaps?). The test pairs over XQuAD-R *questions*
(a question id and its 11 translations form one unit, since translations are not independent): per-query
values are averaged over the seeds, then over the question's languages; the statistic is the mean difference,
with a 95% bootstrap interval and a two-sided sign-flip permutation p-value (numpy only), Holm-adjusted within
each model. Tatoeba pairs over sentence pairs (both directions averaged). The interaction test takes, per
question, the hybrid-minus-baseline gap under every loss; its statistic is the variance of the losses' mean
gaps, its null distribution permutes the loss labels within each question (no interaction: the gaps are
exchangeable across losses). The seeds' spread is reported next to
it: the question-level test measures how consistently one arm beats the other across questions, not how much
a retrained model would vary (3 seeds cannot carry a test of their own), and each paired test also lists the
gap of every seed's two runs alone (`seed_gaps`).
"""

from __future__ import annotations

import copy
import datetime
import gzip
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
from mlret.loop import Hook  # noqa: E402


def define_flags() -> dict[str, Any]:
    """The command line (defined only when run as a script, so that tests can import this module next to other
    absl programs without duplicate flags)."""
    return {
        "out": flags.DEFINE_string("out", "docs/study/runs", "where the per-run files go (one folder per model; "
                                   "the finished runs are kept in the repository)"),
        "models": flags.DEFINE_list("models", ["me5"], "starting models (configs/study.py arguments)"),
        "losses": flags.DEFINE_list("losses", ["infonce", "eq1", "symmetric", "vrn"],
                                    "loss rows (configs/study.py LOSSES), in run order"),
        "alphas": flags.DEFINE_list("alphas", ["0.5", "1", "0"], "alpha values, in run order"),
        "cells": flags.DEFINE_list("cells", [], "LOSS:ALPHA cells in run order (per seed), instead of --losses x "
                                              "--alphas: e.g. infonce:0.5,eq1:0.5,infonce:0,eq1:0 for a 2x2 first"),
        "minilm_alphas": flags.DEFINE_list("minilm_alphas", ["0.5", "1", "0"],
                                           "alpha values for the minilm start (the weaker start: the three arms)"),
        "seeds": flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (the data schedule's PRNG)"),
        "preset": flags.DEFINE_enum("preset", "cpu", ["cpu", "gpu"], "cpu: configs/study.py as it is; gpu: its "
                                    "GPU_OVERRIDES (batch 100, full evaluation sets; one H100/H200)"),
        "set": flags.DEFINE_multi_string("set", [], "config override field=value for every run (e.g. "
                                                    "train.steps=20)"),
        "zero_shot": flags.DEFINE_bool("zero_shot", True, "evaluate the untrained model too (off for a second "
                                                          "process sharing --out)"),
        "report_only": flags.DEFINE_bool("report_only", False, "write the report from finished runs; train nothing"),
        "no_report": flags.DEFINE_bool("no_report", False, "run, but do not write the report"),
        "docs": flags.DEFINE_string("docs", str(REPO / "docs" / "study"), "report folder (summary.json, PNG files,"
                                                                             " section.md)"),
        "results_md": flags.DEFINE_string("results_md", str(REPO / "docs" / "results.md"),
                                          "the markdown file whose study section is replaced ('' to skip)"),
        "resamples": flags.DEFINE_integer("resamples", 20000, "bootstrap / permutation resamples"),
    }


FLAGS: dict[str, Any] = {}
LOSS_NAMES = ("eq1", "infonce", "symmetric", "vrn")  # configs/study.py LOSSES, in table order

log = logging.getLogger("study")

HYBRID, MONO, XY = 0.5, 1.0, 0.0
MARK_BEGIN = "<!-- study:begin (written by scripts/study.py; edit the script, not this section) -->"
MARK_END = "<!-- study:end -->"
# Summary metrics of the report: (evaluator, key, label, higher is better). The question's metrics first.
METRICS = [
    ("xquad_r", "mono_mrr", "mono MRR", True),
    ("xquad_r", "mono_acc1", "mono acc@1", True),
    ("xquad_r", "cross_mrr", "cross MRR", True),
    ("xquad_r", "cross_acc1", "cross acc@1", True),
    ("xquad_r", "multi_mrr", "multi MRR", True),
    ("xquad_r", "multi_acc1", "multi acc@1", True),
    ("xquad_r", "multi_map", "multi mAP", True),
    ("xquad_r", "multi_r10", "multi R@10", True),
    ("xquad_r", "rank_distance", "lang. bias (rank dist.)", False),
    ("tatoeba", "acc", "Tatoeba acc", True),
    ("tydiqa", "mrr", "TyDi MRR@10 (sample, 6 q.)", True),
    ("tydiqa", "acc1", "TyDi acc@1 (sample, 6 q.)", True),
]
# Per-query values tested (name in the run file, label, higher is better).
TESTED = [
    ("mono_mrr", "mono MRR", True),
    ("mono_acc1", "mono acc@1", True),
    ("cross_mrr", "cross MRR", True),
    ("cross_acc1", "cross acc@1", True),
    ("multi_mrr", "multi MRR", True),
    ("multi_acc1", "multi acc@1", True),
    ("multi_map", "multi mAP", True),
    ("multi_r10", "multi R@10", True),
    ("rank_distance", "lang. bias", False),
    ("tatoeba_acc", "Tatoeba acc", True),
]
# The two-way tables and heatmaps of the report: the question's metrics.
TWO_WAY = [m for m in METRICS if m[1] in ("mono_mrr", "mono_acc1", "cross_mrr", "cross_acc1", "multi_mrr",
                                          "multi_acc1")]


# ------------------------------------------------------------------------------------------------ configs


def load_config(model_key: str, overrides: Sequence[str], loss: str = "infonce") -> Any:
    """configs/study.py:<model_key> with the loss row `loss` and `field=value` overrides (the value parsed as
    the field's type; they win over the loss row)."""
    from mlret.config import apply_overrides, load_config_file, load_config_module
    from mlret.errors import ConfigError

    losses = load_config_module(REPO / "configs" / "study.py").LOSSES
    if loss not in losses:
        raise app.UsageError(f"--losses: {loss!r} is not one of {', '.join(losses)} (configs/study.py LOSSES)")
    config = load_config_file(REPO / "configs" / "study.py", model_key)
    config.loss.update(losses[loss])
    try:
        apply_overrides(config, overrides)
    except ConfigError as e:
        raise app.UsageError(f"--set {e}") from None
    return config


def run_name(loss: str, alpha: float, seed: int) -> str:
    return f"{loss}_alpha{alpha:g}_seed{seed}"


# ------------------------------------------------------------------------------------------------ per-query

LAREQA = ("xquad_r", "mlqa_r")
PER_QUERY = ("map", "mrr", "acc1")  # the LAReQA per-query metrics tested in every setting


def keyed(languages: Sequence[str], ids: Sequence[str], values: Any) -> dict[str, float]:
    """Per-query values by '<lang>:<id>' (the unit key of `cluster_means`)."""
    return {f"{x}:{q}": float(v) for x, q, v in zip(languages, ids, values, strict=True)}


def per_query_values(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The tested per-query values (TESTED) from the evaluators' own per-query results (`EvalResult.per_query`):
    LAReQA mono / cross / multi AP, RR and hit@1 per question of each language (cross: the mean over the target
    languages the question exists in), multi R@10 and rank distance; Tatoeba, per sentence pair, the mean of its
    xx->en and en->xx hits. TyDi QA (11 examples) is left to its summary: too few for a test."""
    out: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        pq = result.per_query
        if name in LAREQA:
            for setting in ("mono", "multi"):
                if setting in pq:
                    rows = pq[setting]
                    out.update({f"{setting}_{k}": keyed(rows.languages, rows.ids, rows.values[k]) for k in PER_QUERY})
            if "multi" in pq:
                rows = pq["multi"]
                out.update(multi_r10=keyed(rows.languages, rows.ids, rows.values["r10"]),
                           rank_distance=keyed(rows.languages, rows.ids, rows.values["rank_distance"]))
            if "cross" in pq:
                rows = pq["cross"]
                for k in PER_QUERY:
                    by_query: dict[str, list[float]] = {}
                    for key, v in keyed(rows.languages, [f"{q}>{y}" for q, y in zip(rows.ids, rows.targets)],
                                        rows.values[k]).items():
                        by_query.setdefault(key.rpartition(">")[0], []).append(v)
                    out[f"cross_{k}"] = {key: float(np.mean(v)) for key, v in by_query.items()}
        elif name == "tatoeba":
            rows = pq["pairs"]
            out["tatoeba_acc"] = keyed(rows.languages, rows.ids, (rows.values["xx2en"] + rows.values["en2xx"]) / 2)
    return out


# ------------------------------------------------------------------------------------------------ runner


class BatchTypes(Hook):
    """The batch type ("mono" / "cross") of every step, in order."""

    def __init__(self) -> None:
        self.types: list[str] = []

    def metrics(self, loop: Any, step: int, m: Any) -> None:
        self.types.append(m["batch_type"])


class ModelRunner:
    """One starting model: loaded once (its weights kept on the host), one set of evaluators, one train step
    (compiled once) per loss row, the current one alive; the devices hold only the current run's state."""

    def __init__(self, model_key: str, config: Any, overrides: Sequence[str] = ()) -> None:
        import jax
        from flax import nnx

        from mlret import parallel
        from mlret.config import validate
        from mlret.data.pipeline import load_sources
        from mlret.eval import build_evaluators
        from mlret.models import load_dual_encoder

        validate(config)
        self.key = model_key
        self.overrides = list(overrides)
        t0 = time.perf_counter()
        parallel.enable_compilation_cache(config.train.compilation_cache_dir)
        self.mesh = parallel.make_mesh(config.mesh)
        model, self.tokenizer = load_dual_encoder(config)
        self.graphdef, state = nnx.split(model)
        self.weights = jax.device_get(state)  # the loaded model, on the host
        del model, state
        self.loss: str | None = None
        self._build(config)
        self.evaluators = build_evaluators(config)
        self.sources = load_sources(config)
        self.num_units = sum(len(store) for _, store in self.sources)
        log.info("%s: loaded %s in %.1f s", model_key, config.model.name, time.perf_counter() - t0)

    def _build(self, config: Any) -> None:
        """The train step of `config`, and its starting parameters on the host (every run starts from them)."""
        import jax
        from flax import nnx

        from mlret.step import build_train_step

        self.trainer = None  # free the previous step before building the next
        self.trainer, params = build_train_step(nnx.merge(self.graphdef, self.weights), config, self.mesh)
        self.initial = jax.device_get(params)
        self.config = config

    def use_loss(self, loss: str) -> None:
        """Make the train step of loss row `loss` the current one (VRN's k: the training mixture's unit count)."""
        if loss == self.loss:
            return
        config = load_config(self.key, self.overrides, loss)
        if config.loss.vrn_weight and not config.loss.vrn_instances:
            config.loss.vrn_instances = self.num_units
        self._build(config)
        self.loss = loss

    def evaluate(self, params: Any, step: int) -> dict[str, Any]:
        """The evaluators' results (mlret.eval.EvalResult by name) for the model with `params` (on the mesh)."""
        from mlret.hooks import evaluate_params

        return evaluate_params(self.evaluators, self.trainer, params, self.config, step)

    def zero_shot(self) -> dict[str, Any]:
        """The results of the untrained model."""
        import jax

        return self.evaluate(jax.device_put(self.initial["model"], self.trainer.state_shardings["params"]["model"]),
                             0)

    def train(self, alpha: float, seed: int, log_dir: Path) -> tuple[Any, dict[str, Any]]:
        """Train one run from the loaded weights through mlret's loop (`mlret.loop.run_loop`: the non-finite
        stop, metrics.jsonl / TensorBoard in `log_dir`, the progress line); returns (final params, record)."""
        import jax

        from mlret.console import Console
        from mlret.data.pipeline import make_train_iterator
        from mlret.hooks import MetricLog, NonFiniteStop
        from mlret.loop import run_loop
        from mlret.metrics_log import MetricWriter

        config = copy.deepcopy(self.config)
        config.data.alpha = float(alpha)
        config.seed = int(seed)
        data = make_train_iterator(config, self.tokenizer, process_index=0, process_count=1, sources=self.sources)
        types = BatchTypes()
        hooks = [NonFiniteStop(config.optim.max_nonfinite_in_row),
                 MetricLog(MetricWriter(log_dir), config.train.log_every, Console()), types]
        t0, c0 = time.perf_counter(), time.process_time()
        loop = run_loop(self.trainer, self.trainer.init_state(self.initial), data, start=0,
                        total=int(config.train.steps), hooks=hooks)
        record = {"losses": [loop.losses[s] for s in sorted(loop.losses)], "batch_types": types.types,
                  "train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - c0,
                  "nonfinite_total": int(jax.device_get(loop.state["nonfinite_total"]))}
        return loop.state["params"]["model"], record


def write_json(path: Path, data: Any) -> None:
    """`data` as JSON at `path`, gzip'd when the name ends in .gz (a run's per-query values are 1.4 MiB of JSON,
    180 KiB compressed: small enough to keep the finished runs in the repository, so a study resumes across
    machines). Written atomically: a killed study never leaves a half-written run behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(data, indent=None if path.suffix == ".gz" else 1, sort_keys=True, default=float)
    if path.suffix == ".gz":
        tmp.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())


def strip_results(results: dict[str, Any]) -> dict[str, Any]:
    """The evaluator blocks without bulky or non-JSON parts (keep summaries and per-language tables)."""
    keep = ("summary", "mono", "cross", "multi", "languages", "queries", "candidates", "candidates_total",
            "options", "seconds")
    return {name: {k: v for k, v in block.items() if k in keep} for name, block in results.items()}


Run = tuple[str, str | None, float | None, int | None]  # (model, loss, alpha, seed); loss None: zero-shot


def plan_runs(models: Sequence[str], losses: Sequence[str], alphas: Sequence[str], minilm_alphas: Sequence[str],
              seeds: Sequence[str], cells: Sequence[str] = ()) -> list[Run]:
    """(model, loss, alpha, seed) in run order; (model, None, None, None) = the zero-shot row. Seed-major, so
    that a partial study already holds every cell of the grid for the first seeds; within a seed, the loss x
    alpha product, or the `LOSS:ALPHA` cells in their given order."""
    parsed = []
    for cell in cells:
        loss, sep, alpha = cell.partition(":")
        if not sep:
            raise app.UsageError(f"--cells: {cell!r} is not LOSS:ALPHA")
        parsed.append((loss, float(alpha)))
    runs: list[Run] = []
    for m in models:
        runs.append((m, None, None, None))
        grid = parsed or [(loss, float(a)) for loss in losses for a in (minilm_alphas if m == "minilm" else alphas)]
        for s in seeds:
            runs += [(m, loss, a, int(s)) for loss, a in grid]
    return runs


def run_file(out: Path, run: Run) -> Path:
    model, loss, alpha, seed = run
    return out / model / ("zero_shot.json.gz" if loss is None else f"{run_name(loss, alpha, seed)}.json.gz")


def finished(out: Path, run: Run) -> bool:
    """Whether the run's file exists (gzip'd JSON, or the plain JSON of earlier versions of this script)."""
    path = run_file(out, run)
    return path.exists() or path.with_suffix("").exists()


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_study(out: Path, runs: list[Run], overrides: Sequence[str]) -> None:
    todo = [r for r in runs if not finished(out, r)]
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to go -> {out}", flush=True)
    start = time.perf_counter()
    done = 0
    runner: ModelRunner | None = None
    for run in todo:
        model_key, loss, alpha, seed = run
        if runner is None or runner.key != model_key:
            runner = None  # free the previous model before loading the next
            runner = ModelRunner(model_key, load_config(model_key, overrides), overrides)
        name = run_file(out, run).stem
        t0 = time.perf_counter()
        if loss is None:
            params, record = None, {"losses": [], "train_seconds": 0.0}
        else:
            runner.use_loss(loss)
            params, record = runner.train(alpha, seed, out / model_key / "logs" / name)
        t1 = time.perf_counter()
        results = runner.zero_shot() if params is None else runner.evaluate(params, int(runner.config.train.steps))
        del params
        record.update({
            "model": model_key, "model_name": runner.config.model.name, "loss": loss, "alpha": alpha, "seed": seed,
            "eval_seconds": time.perf_counter() - t1,
            "results": strip_results({n: r.block() for n, r in results.items()}),
            "per_query": per_query_values(results),
            "config": runner.config.to_dict(), "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        })
        write_json(run_file(out, run), record)
        done += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (len(todo) - done)
        summ = results["xquad_r"].summary if "xquad_r" in results else {}
        acc = results["tatoeba"].summary["acc"] if "tatoeba" in results else float("nan")
        print(f"[{done}/{len(todo)}] {model_key} {name}: train {record['train_seconds']:.0f}s eval "
              f"{record['eval_seconds']:.0f}s | multi_map={summ.get('multi_map', float('nan')):.4f} "
              f"rank_distance={summ.get('rank_distance', float('nan')):.1f} tatoeba_acc={acc:.4f} | "
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
    """{model: {"zero_shot": run, "runs": {(loss, alpha): [runs by seed]}}} from the finished files."""
    found: dict[str, dict[str, Any]] = {}
    for model_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        entry: dict[str, Any] = {"zero_shot": None, "runs": {}}
        for f in sorted([*model_dir.glob("*.json.gz"), *model_dir.glob("*.json")]):
            run = read_json(f)
            if run["alpha"] is None:
                entry["zero_shot"] = run
            else:
                entry["runs"].setdefault((run.get("loss", "infonce"), float(run["alpha"])), []).append(run)
        for cell in entry["runs"].values():
            cell.sort(key=lambda r: r["seed"])
        found[model_dir.name] = entry
    return found


def summary_value(run: dict[str, Any], evaluator: str, key: str) -> float:
    return float(run["results"].get(evaluator, {}).get("summary", {}).get(key, float("nan")))


def alpha_label(alpha: float) -> str:
    return {1.0: "X-X-mono (α=1)", 0.0: "X-Y (α=0)", 0.5: "hybrid (α=0.5)"}.get(alpha, f"α={alpha:g}")


LOSS_LABELS = {"eq1": "Eq. 1 as written", "infonce": "InfoNCE, in-batch", "symmetric": "+ symmetric", "vrn": "+ VRN"}


def loss_label(loss: str) -> str:
    return LOSS_LABELS.get(loss, loss)


def ordered_losses(cells: Any) -> list[str]:
    present = {loss for loss, _ in cells}
    return [x for x in LOSS_NAMES if x in present] + sorted(present - set(LOSS_NAMES))


def question_units(runs: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """Per-query values of `metric` averaged over the runs (seeds), then per test unit (module docstring)."""
    return cluster_means(seed_mean_per_query(runs, metric), by_id=not metric.startswith("tatoeba"))


def shared_seed_runs(cells: dict, a: tuple, b: tuple) -> tuple[list, list, list[int]]:
    seeds = sorted({r["seed"] for r in cells[a]} & {r["seed"] for r in cells[b]})
    return [r for r in cells[a] if r["seed"] in seeds], [r for r in cells[b] if r["seed"] in seeds], seeds


def seed_gaps(hybrid: list[dict[str, Any]], base: list[dict[str, Any]], metric: str) -> list[float]:
    """The hybrid-minus-baseline gap of each shared seed alone (the runs of seed s against each other), over the
    units every seed has. The question-level test above pools the seeds; these show whether retraining with
    another schedule would keep the sign (their mean is the tested mean difference)."""
    per = [(question_units([h], metric), question_units([b], metric)) for h, b in zip(hybrid, base)]
    units = sorted(set.intersection(*(set(ch) & set(cb) for ch, cb in per)))
    return [float(np.mean([ch[u] - cb[u] for u in units])) for ch, cb in per]


def interaction_test(gaps: np.ndarray, resamples: int, rng: np.random.Generator) -> dict[str, float]:
    """gaps [losses, units]: per unit, the hybrid-minus-baseline gap under each loss. Statistic: the variance of
    the losses' mean gaps; null: the loss labels permuted within each unit. Returns the statistic, the
    permutation p (with the +1 of the observed assignment) and the range of the mean gaps."""
    L, n = gaps.shape
    stat = float(np.var(gaps.mean(axis=1)))
    count = 0
    for _ in range(resamples):
        perm = np.argsort(rng.random((L, n)), axis=0)
        count += np.var(np.take_along_axis(gaps, perm, axis=0).mean(axis=1)) >= stat - 1e-15
    return {"statistic": stat, "p": (1 + count) / (resamples + 1), "n": n,
            "mean_gaps": gaps.mean(axis=1).tolist()}


def build_report(out: Path, docs: Path, resamples: int) -> dict[str, Any]:
    from mlret.eval.base import heatmap
    from mlret.eval.lareqa import pair_matrix

    data = load_runs(out)
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {"models": {}}
    docs.mkdir(parents=True, exist_ok=True)
    for model, entry in data.items():
        cells = entry["runs"]
        m_rep: dict[str, Any] = {"rows": [], "tests": [], "interaction": [], "model_name": None,
                                 "losses": ordered_losses(cells)}
        zs = entry["zero_shot"]
        if zs is not None:
            m_rep["model_name"] = zs["model_name"]
            m_rep["rows"].append({"loss": None, "setting": "zero-shot", "alpha": None, "seeds": 0,
                                  "metrics": {k: [summary_value(zs, e, k), 0.0] for e, k, _, _ in METRICS}})
        for loss in m_rep["losses"]:
            for alpha in sorted((a for x, a in cells if x == loss), key=lambda a: -a):  # X-X-mono first
                runs = cells[(loss, alpha)]
                m_rep["model_name"] = m_rep["model_name"] or runs[0]["model_name"]
                row = {"loss": loss, "setting": alpha_label(alpha), "alpha": alpha, "seeds": len(runs),
                       "metrics": {}, "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
                       "eval_seconds": float(np.mean([r["eval_seconds"] for r in runs])),
                       "final_loss": float(np.mean([np.mean(r["losses"][-10:]) for r in runs])),
                       "first_loss": float(np.mean([np.mean(r["losses"][:10]) for r in runs]))}
                for e, k, _, _ in METRICS:
                    vals = np.array([summary_value(r, e, k) for r in runs])
                    row["metrics"][k] = [float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0]
                m_rep["rows"].append(row)
        # Paired tests: hybrid vs each baseline under each loss, over the seeds both cells share.
        tests = []
        for loss in m_rep["losses"]:
            for base in (MONO, XY):
                if (loss, HYBRID) not in cells or (loss, base) not in cells:
                    continue
                h, b, seeds = shared_seed_runs(cells, (loss, HYBRID), (loss, base))
                for metric, label, higher in TESTED:
                    if not seeds or not all(metric in r["per_query"] for r in h + b):
                        continue
                    ch, cb = question_units(h, metric), question_units(b, metric)
                    units = sorted(set(ch) & set(cb))
                    t = paired_test(np.array([ch[u] for u in units]), np.array([cb[u] for u in units]), resamples,
                                    rng)
                    t.update({"loss": loss, "baseline": alpha_label(base), "alpha": base, "metric": metric,
                              "label": label, "higher_is_better": higher, "seeds": seeds,
                              "seed_gaps": seed_gaps(h, b, metric),
                              "unit": "sentence pair" if metric.startswith("tatoeba") else "XQuAD-R question"})
                    tests.append(t)
        for t, p_adj in zip(tests, holm([t["p"] for t in tests])):
            t["p_holm"] = p_adj
        m_rep["tests"] = tests
        m_rep["interaction"] = interactions(cells, m_rep["losses"], resamples, rng)
        m_rep["figures"] = draw_figures(model, m_rep, cells, docs, heatmap, pair_matrix)
        report["models"][model] = m_rep
    write_json(docs / "summary.json", report)
    return report


def interactions(cells: dict, losses: list[str], resamples: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per baseline and tested metric: does the hybrid-minus-baseline gap depend on the loss? Over the units
    and seeds every loss has (Holm-adjusted over these tests)."""
    out = []
    for base in (MONO, XY):
        have = [x for x in losses if (x, HYBRID) in cells and (x, base) in cells]
        if len(have) < 2:
            continue
        seeds = sorted(set.intersection(*({r["seed"] for r in cells[(x, a)]} for x in have for a in (HYBRID, base))))
        if not seeds:
            continue
        for metric, label, higher in TESTED:
            runs = {(x, a): [r for r in cells[(x, a)] if r["seed"] in seeds] for x in have for a in (HYBRID, base)}
            if not all(metric in r["per_query"] for rs in runs.values() for r in rs):
                continue
            per = {k: question_units(rs, metric) for k, rs in runs.items()}
            units = sorted(set.intersection(*(set(v) for v in per.values())))
            gaps = np.array([[per[(x, HYBRID)][u] - per[(x, base)][u] for u in units] for x in have])
            t = interaction_test(gaps, resamples, rng)
            t.update({"baseline": alpha_label(base), "metric": metric, "label": label, "losses": have,
                      "seeds": seeds, "higher_is_better": higher})
            out.append(t)
    for t, p_adj in zip(out, holm([t["p"] for t in out])):
        t["p_holm"] = p_adj
    return out


def draw_figures(model: str, m_rep: dict[str, Any], cells: dict, docs: Path, heatmap: Any,
                 pair_matrix: Any) -> list[str]:
    """Two-way heatmaps (loss x batching) of the question's metrics, the hybrid-minus-baseline gaps per loss, and
    the XQuAD-R pair-mAP difference hybrid minus each baseline under each loss."""
    files = []
    losses = m_rep["losses"]
    arms = [a for a in (MONO, XY, HYBRID) if any((x, a) in cells for x in losses)]
    if not losses or not arms:
        return files
    rows = {(r["loss"], r["alpha"]): r for r in m_rep["rows"] if r["loss"] is not None}
    for _, key, label, _ in TWO_WAY:
        mat = np.array([[rows[(x, a)]["metrics"][key][0] if (x, a) in rows else np.nan for a in arms]
                        for x in losses])
        path = docs / f"{model}_two_way_{key}.png"
        heatmap(str(path), mat, [loss_label(x) for x in losses], [alpha_label(a) for a in arms],
                f"{model}: XQuAD-R {label} (mean over seeds)", xlabel="batching", ylabel="loss", fmt="{:.3f}",
                vmin=None, vmax=None)
        files.append(path.name)
    gap_cols = [(key, base) for _, key, _, _ in TWO_WAY for base in (MONO, XY)]
    gaps = np.array([[rows[(x, HYBRID)]["metrics"][k][0] - rows[(x, b)]["metrics"][k][0]
                      if (x, HYBRID) in rows and (x, b) in rows else np.nan for k, b in gap_cols] for x in losses])
    if np.isfinite(gaps).any():
        lim = max(0.005, float(np.nanmax(np.abs(gaps))))
        path = docs / f"{model}_hybrid_gaps.png"
        heatmap(str(path), gaps, [loss_label(x) for x in losses],
                [f"{k.replace('_', ' ')} −{'mono' if b == MONO else 'X-Y'}" for k, b in gap_cols],
                f"{model}: hybrid minus baseline (positive: hybrid better), by loss", xlabel="metric − baseline",
                ylabel="loss", fmt="{:+.3f}", vmin=-lim, vmax=lim)
        files.append(path.name)
    for x in losses:
        for base in (MONO, XY):
            if (x, HYBRID) not in cells or (x, base) not in cells:
                continue
            h = np.mean([pair_matrix(r["results"]["xquad_r"], "mrr") for r in cells[(x, HYBRID)]], axis=0)
            b = np.mean([pair_matrix(r["results"]["xquad_r"], "mrr") for r in cells[(x, base)]], axis=0)
            langs = cells[(x, HYBRID)][0]["results"]["xquad_r"]["languages"]
            d = h - b
            lim = max(0.01, float(np.nanmax(np.abs(d))))
            path = docs / f"{model}_{x}_pairs_mrr_hybrid_minus_alpha{base:g}.png"
            heatmap(str(path), d, langs, langs, f"{model}, {loss_label(x)}: XQuAD-R MRR, hybrid minus "
                    f"{alpha_label(base)}\nrows: query language, columns: candidate language",
                    xlabel="candidate language", ylabel="query language", fmt="{:+.2f}", vmin=-lim, vmax=lim)
            files.append(path.name)
    return files


def _cell(mean: float, std: float, seeds: int, key: str) -> str:
    if math.isnan(mean):
        return "–"
    fmt = "{:.1f}" if key == "rank_distance" else "{:.4f}"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if seeds > 1 else "")


def markdown(report: dict[str, Any], out: Path, docs: Path, results_md: Path | None,
             scale_notes: Sequence[str] = ()) -> str:
    """The docs/results.md section: setup, commands, tables, tests, figures."""
    rel = os.path.relpath(docs, results_md.parent) if results_md else str(docs)
    found = load_runs(out).values()
    any_run = next((r for m in found for r in [*(r for rs in m["runs"].values() for r in rs), m["zero_shot"]] if r),
                   None)
    cfg = any_run["config"] if any_run else None
    lines = [MARK_BEGIN, "", "## Offline study: the loss objective x hybrid batches (this CPU)", ""]
    if cfg:
        d, o, ev = cfg["data"], cfg["optim"], cfg["eval"]
        lines += [
            "Setup, scaled down to the 2-core CPU of this machine (every reduction is listed; `configs/paper.py` "
            "holds the full-size experiment):",
            "",
            "- Training data: MLQA-R units (7 languages: ar de en es hi vi zh), the offline stand-in for the paper's "
            "translated QA data. Evaluation is zero-shot on XQuAD-R (11 languages; el, ru, th, tr unseen in "
            "training), Tatoeba and TyDi QA.",
            f"- Batch {d['global_batch']} pairs (paper: 100), {d['group_size'] - 1} hard negative(s) each; query "
            f"length {d['query_len']}, passage length {d['passage_len']} in training.",
            f"- {cfg['train']['steps']} steps per run (paper: epochs), AdamW lr {o['learning_rate']:g}, weight decay "
            f"{o['weight_decay']:g}, {o['warmup_steps']} warm-up steps then linear decay to 0, τ = "
            f"{cfg['loss']['temperature']:g}, cosine similarity.",
            "- Loss rows (configs/study.py `LOSSES`): " + "; ".join(
                f"{loss_label(x)} = `{x}`" for x in LOSS_NAMES) + ". Eq. 1: own positive + the hard negatives of "
            "every pair; InfoNCE: every passage of the batch; + symmetric: InfoNCE averaged with the positive → "
            "query direction (2506.09781's within-view negatives off); + VRN: + symmetric plus "
            f"λ · mean |cos − δ|^p over the negative pairs (the VRN row's λ = "
            f"{_vrn_weight()}, p = 2, δ = −1/(k−1) with k the training units).",
            f"- XQuAD-R subset: the first {ev['xquad_r']['max_paragraphs']} paragraphs of every language (all 11 "
            "languages, all settings: mono, cross, multilingual with language bias), candidates are sentences "
            f"alone, each question encoded once per model; eval lengths query {ev['query_len']}, passage "
            f"{ev['passage_len']}.",
            f"- Tatoeba subset: the first {ev['tatoeba']['max_sentences']} sentence pairs of each of "
            f"{len(ev['tatoeba']['languages'].split(','))} languages ({ev['tatoeba']['languages']}), "
            "xx→en and en→xx accuracy.",
            "- TyDi QA: only the offline 11-example sample (`tydiqa-primary-sample/tiny_dev.jsonl.gz`, one "
            "question per language, candidates its article's passages; the 6 with a gold passage are scored) "
            "can be evaluated here: its MRR@10 and acc@1 are listed, labelled as the sample, and not tested.",
            "- Seeds change the data schedule (batch types, languages, units); every run starts from the same "
            "weights.",
        ]
    lines += ["Scale choices of these runs (configs/study.py `SCALE_NOTES`):", "",
              *[f"- {note}" for note in scale_notes], ""] if scale_notes else []
    lines += [
        "Commands (the second one only rewrites this section and the figures from the finished runs):",
        "",
        "```bash",
        f"python scripts/study.py --out {out}",
        f"python scripts/study.py --out {out} --report_only",
        "```",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores, one jax CPU device, jax "
        f"{_version('jax')}, flax {_version('flax')}. " + _time_span(out),
        "",
    ]
    for model, m in report["models"].items():
        lines += [f"### Start: {model} (`{m['model_name']}`)", ""]
        lines += _two_way_tables(m) + [""]
        header = "| loss | batching | seeds | " + " | ".join(label for _, _, label, _ in METRICS) + " |"
        lines += ["Every cell, every metric (mean ± std over seeds):", "", header, "|" + "---|" * (len(METRICS) + 3)]
        for row in m["rows"]:
            cells = [_cell(*row["metrics"][k], row["seeds"], k) for _, k, _, _ in METRICS]
            lines.append(f"| {loss_label(row['loss']) if row['loss'] else '–'} | {row['setting']} | "
                         f"{row['seeds'] or '–'} | " + " | ".join(cells) + " |")
        trained = [r for r in m["rows"] if r["seeds"]]
        if trained:
            lines += ["", "Mean loss of the first / last 10 steps, and wall seconds per run (train / eval; the "
                          "machine was shared, so these vary with its load): " + "; ".join(
                f"{r['loss']} {r['setting']}: {r['first_loss']:.3f} → {r['final_loss']:.3f}, "
                f"{r['train_seconds']:.0f} s / {r['eval_seconds']:.0f} s" for r in trained) + "."]
        if m["tests"]:
            lines += ["", "Paired tests, hybrid (α=0.5) minus baseline under each loss (per-query values averaged "
                          "over the shared seeds, then per unit; two-sided sign-flip permutation test, "
                          "Holm-adjusted over all of this model's hybrid-vs-baseline tests; per seed: the same gap "
                          "from each seed's two runs alone, whose spread the question-level test does not see; "
                          "language bias: negative is better):", "",
                      "| loss | baseline | metric | unit (n) | hybrid − baseline [95% CI] | per seed | hybrid better / "
                      "worse | p | p (Holm) |", "|---|---|---|---|---|---|---|---|---|"]
            for t in m["tests"]:
                better, worse = (t["wins"], t["losses"]) if t["higher_is_better"] else (t["losses"], t["wins"])
                lines.append(f"| {loss_label(t['loss'])} | {t['baseline']} | {t['label']} | {t['unit']} ({t['n']}) | "
                             f"{t['mean_diff']:+.4f} [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] | "
                             f"{', '.join(f'{g:+.4f}' for g in t['seed_gaps'])} | {better} / {worse} "
                             f"| {fmt_p(t['p'])} | {fmt_p(t['p_holm'])} |")
        if m["interaction"]:
            lines += ["", "Interaction (does the loss change the hybrid-minus-baseline gap?): per unit, the gap under "
                          "each loss; statistic the variance of the losses' mean gaps, permutation of the loss "
                          "labels within each unit; Holm-adjusted over these tests:", "",
                      "| baseline | metric | mean gap per loss (" + ", ".join(
                          m["interaction"][0]["losses"]) + ") | n | p | p (Holm) |", "|---|---|---|---|---|---|"]
            for t in m["interaction"]:
                lines.append(f"| {t['baseline']} | {t['label']} | " + ", ".join(f"{g:+.4f}" for g in t["mean_gaps"])
                             + f" | {t['n']} | {fmt_p(t['p'])} | {fmt_p(t['p_holm'])} |")
        if m["figures"]:
            lines += ["", "Figures: " + ", ".join(f"[{f}]({rel}/{f})" for f in m["figures"]) + ".", ""]
            for f in m["figures"]:
                if "gaps" in f or f.endswith("two_way_multi_mrr.png"):
                    lines.append(f"![{f}]({rel}/{f})")
        lines.append("")
    lines += [MARK_END]
    return "\n".join(lines)


def _two_way_tables(m: dict[str, Any]) -> list[str]:
    """One loss x batching table per metric of the question (mean ± std over seeds)."""
    rows = {(r["loss"], r["alpha"]): r for r in m["rows"] if r["loss"] is not None}
    arms = [a for a in (MONO, XY, HYBRID) if any(k[1] == a for k in rows)]
    zero = next((r for r in m["rows"] if r["loss"] is None), None)
    lines = []
    for _, key, label, _ in TWO_WAY if rows else ():
        untrained = f"; zero-shot {_cell(zero['metrics'][key][0], 0.0, 0, key)}" if zero else ""
        lines += ["", f"**{label}** (XQuAD-R; rows: loss, columns: batching{untrained})", "",
                  "| loss | " + " | ".join(alpha_label(a) for a in arms) + " |", "|---|" + "---|" * len(arms)]
        for x in m["losses"]:
            lines.append(f"| {loss_label(x)} | " + " | ".join(
                _cell(*rows[(x, a)]["metrics"][key], rows[(x, a)]["seeds"], key) if (x, a) in rows else "–"
                for a in arms) + " |")
    return lines


def _vrn_weight() -> str:
    from mlret.config import load_config_module

    return f"{load_config_module(REPO / 'configs' / 'study.py').LOSSES['vrn']['vrn_weight']:g}"


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
    from mlret.config import load_config_module

    study_config = load_config_module(REPO / "configs" / "study.py")
    gpu = f["preset"] == "gpu"
    overrides = [*(study_config.GPU_OVERRIDES if gpu else ()), *f["set"]]
    if not f["report_only"]:
        runs = plan_runs(f["models"], f["losses"], f["alphas"], f["minilm_alphas"], f["seeds"], f["cells"])
        run_study(out, [r for r in runs if f["zero_shot"] or r[1] is not None], overrides)
    if f["no_report"]:
        return
    docs = Path(f["docs"])
    report = build_report(out, docs, f["resamples"])
    results_md = Path(f["results_md"]) if f["results_md"] else None
    notes = study_config.GPU_SCALE_NOTES if gpu else study_config.SCALE_NOTES
    section = markdown(report, out, docs, results_md, notes)
    (docs / "section.md").write_text(section + "\n")
    if results_md is not None:
        update_results_md(results_md, section)
        print(f"study: report in {docs} and {results_md}", flush=True)
    else:
        print(f"study: report in {docs}", flush=True)


if __name__ == "__main__":
    FLAGS.update(define_flags())
    app.run(main)
