"""Evaluation: benchmark protocols (LAReQA on XQuAD-R / MLQA-R, MIRACL, Mr. TyDi, TyDi QA, Tatoeba), exact and
ScaNN retrieval, trec_eval-compatible metrics, and the sharded encoder that feeds them.

The training loop and `python -m mlret.evaluate` use three calls:

    evaluators = build_evaluators(config)              # from config.eval (names in config.eval.evaluators)
    results = run_evaluators(evaluators, embedder, step, output_dir)   # {name: EvalResult}
    flat_metrics(results)                              # {"xquad_r/multi_map": 0.41, ...} for logs / best ckpt

An embedder is anything with `.queries(texts)` / `.passages(texts)` -> float32 [N, D]; `mlret.eval.encode.
ShardedEmbedder` is the one that runs the model on the mesh. This package imports no jax at import time
(`mlret.config.validate` calls `validate_eval_config`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from mlret.errors import ConfigError
from mlret.eval import dims, registry
from mlret.eval.base import Embedder, EvalContext, EvalResult, Evaluator, EvaluatorSpec, parse_list
from mlret.eval.report import by_dimension
from mlret.eval.retrieval import ON_LOW_RECALL, REORDER_DTYPES, SPHERICAL

log = logging.getLogger(__name__)

__all__ = ["Embedder", "EvalContext", "EvalResult", "Evaluator", "EvaluatorSpec", "build_evaluators", "flat_metrics",
           "format_table", "register", "run_evaluators", "validate_eval_config"]

register = registry.register


def validate_eval_config(config: Any) -> None:
    """Check config.eval, each evaluator's section (`mlret.eval.registry`) and checkpoint.best_metric's evaluator
    before any device work; part of `mlret.config.validate`."""
    ev = config.eval
    names = parse_list(ev.evaluators)
    if ev.batch_size <= 0:
        _fail("eval.batch_size", "must be positive")
    if ev.every < 0:
        _fail("eval.every", "must be >= 0 (0: no evaluation during training)")
    if ev.every > 0 and not names:
        _fail("eval.evaluators", "empty although eval.every > 0; name at least one evaluator")
    if ev.at_start and ev.every <= 0:
        _fail("eval.at_start", "set, but config.eval.every is 0 (no evaluators run in training)")
    if ev.retrieval.method not in ("auto", "exact", "scann"):
        _fail("eval.retrieval.method", f"{ev.retrieval.method!r} is not one of auto, exact, scann")
    if ev.retrieval.reorder_dtype not in REORDER_DTYPES:
        _fail("eval.retrieval.reorder_dtype",
              f"{ev.retrieval.reorder_dtype!r} is not one of {', '.join(REORDER_DTYPES)}")
    if ev.retrieval.corpus_dtype not in ("float32", "bfloat16", "float16"):
        _fail("eval.retrieval.corpus_dtype", f"{ev.retrieval.corpus_dtype!r} is not one of float32, bfloat16, float16")
    if ev.retrieval.spherical not in SPHERICAL:
        _fail("eval.retrieval.spherical", f"{ev.retrieval.spherical!r} is not one of {', '.join(SPHERICAL)}")
    if ev.retrieval.on_low_recall not in ON_LOW_RECALL:
        _fail("eval.retrieval.on_low_recall",
              f"{ev.retrieval.on_low_recall!r} is not one of {', '.join(ON_LOW_RECALL)}")
    if not 0.0 <= ev.retrieval.recall_floor <= 1.0:
        _fail("eval.retrieval.recall_floor", f"{ev.retrieval.recall_floor} is not in [0, 1]")
    if ev.retrieval.rank_k < 1:
        _fail("eval.retrieval.rank_k", "must be positive")
    if ev.retrieval.scann_threshold < 1:
        _fail("eval.retrieval.scann_threshold", "must be positive")
    dims.validate(config)
    registry.validate(config)
    best = config.checkpoint.best_metric if "checkpoint" in config else ""
    if best:
        head, _, key = best.partition("/")
        if not key or head not in names:
            _fail("checkpoint.best_metric", f"{best!r} must be '<evaluator>/<summary key>' with the evaluator in "
                                            f"config.eval.evaluators ({','.join(names) or 'empty'})")


def _fail(field: str, why: str) -> None:
    raise ConfigError(f"config.{field}: {why}")


def build_evaluators(config: Any, names: Sequence[str] | None = None) -> list[Evaluator]:
    """The evaluators named in config.eval.evaluators (or `names`), configured from their config.eval sections;
    the config must be valid (`mlret.config.validate`). With `config.eval.dim` or by-dimension reporting
    (`config.eval.dims`, `mlret.eval.dims`) each is wrapped to search and report at those dimensions."""
    return dims.wrap(registry.build(config, names), config)


def run_evaluators(evaluators: Sequence[Evaluator], embedder: Embedder, step: int | None = None,
                   output_dir: str | None = None) -> dict[str, EvalResult]:
    """Run each evaluator; returns {name: EvalResult} with `step` and `seconds` filled in.

    Every host must call this with the same evaluators (the sharded embedder steps all hosts together); the
    matrices and heatmaps are written by process 0 only when `output_dir` is given.
    """
    results: dict[str, EvalResult] = {}
    write = output_dir if output_dir and _process_index() == 0 else None
    for ev in evaluators:
        t0 = time.perf_counter()
        result = ev.run(embedder, write)
        result.seconds = time.perf_counter() - t0
        result.step = step
        results[ev.name] = result
        log.info("eval %s%s: %s (%.1f s)", ev.name, "" if step is None else f" at step {step}",
                 ", ".join(f"{k}={v:.4f}" for k, v in result.summary.items()), result.seconds)
    return results


def flat_metrics(results: dict[str, EvalResult]) -> dict[str, float]:
    """{"<evaluator>/<summary key>": value} over all evaluators (what training logs and best_metric names); with
    evaluation by dimension also "<evaluator>@<d>/<key>" for the `dim_metrics` at every other dimension d."""
    out = {f"{name}/{k}": float(v) for name, result in results.items() for k, v in result.summary.items()}
    for name, result in results.items():
        for d, summary in result.by_dim.items():
            if d != result.dim:
                out.update({f"{name}@{d}/{k}": float(summary[k]) for k in result.dim_metrics if k in summary})
    return out


def format_table(results: dict[str, EvalResult]) -> str:
    """A plain-text table: one block per evaluator, one line per summary metric; then, where the details have
    them, the index that searched (`details["index"]`) and one line per language (`details["languages"]` as
    {language: {metric: value}}, as MIRACL / Mr. TyDi and TyDi QA report)."""
    lines = []
    for name, result in results.items():
        lines.append(f"{name}" + (f"  (step {result.step})" if result.step is not None else ""))
        for k, v in result.summary.items():
            lines.append(f"  {k:<24} {_number(v)}")
        if result.details.get("index"):
            lines.append(f"  search: {result.details['index']}")
        per_lang = result.details.get("languages")
        if isinstance(per_lang, dict) and per_lang and all(isinstance(m, dict) for m in per_lang.values()):
            keys = list(next(iter(per_lang.values())))
            lines.append("  " + f"{'language':<10}" + "".join(f"{k:>12}" for k in keys))
            for lang, m in per_lang.items():
                lines.append("  " + f"{lang:<10}" + "".join(f"{_number(m.get(k)):>12}" for k in keys))
        by_dim = result.by_dim or result.details.get("by_dim")
        if by_dim:
            metrics = result.dim_metrics or result.details.get("dim_metrics", ())
            lines += ["  " + x for x in by_dimension(name, by_dim, metrics).text().splitlines()]
    return "\n".join(lines)


def _number(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _process_index() -> int:
    jax = sys.modules.get("jax")  # no jax import just for this: single-process runs without jax are process 0
    return int(jax.process_index()) if jax is not None else 0
