"""Evaluation: benchmark protocols (LAReQA on XQuAD-R / MLQA-R, MIRACL, Mr. TyDi, TyDi QA, Tatoeba), exact and
ScaNN retrieval, trec_eval-compatible metrics, and the sharded encoder that feeds them.

The training loop and `python -m mlret.evaluate` use three calls:

    evaluators = build_evaluators(config)              # from config.eval (names in config.eval.evaluators)
    results = run_evaluators(evaluators, embedder, step, output_dir)   # {name: {"summary": {...}, ...}}
    flat_metrics(results)                              # {"xquad_r/multi_map": 0.41, ...} for logs / best ckpt

An embedder is anything with `.queries(texts)` / `.passages(texts)` -> float32 [N, D]; `mlret.eval.encode.
ShardedEmbedder` is the one that runs the model on the mesh. This package imports no jax at import time
(`mlret.config.validate` calls `validate_eval_config`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

from mlret.eval.base import Embedder, Evaluator, parse_list
from mlret.eval.lareqa import MLQA_R_LANGUAGES, SETTINGS, XQUAD_R_LANGUAGES, LareqaEvaluator
from mlret.eval.retrieval import REORDER_DTYPES, RetrievalOptions
from mlret.eval.tatoeba import TatoebaEvaluator
from mlret.eval.trec import MIRACL_LANGUAGES, MRTYDI_LANGUAGES, TrecEvaluator
from mlret.eval.tydiqa import TYDI_LANGUAGES, TydiQAEvaluator

log = logging.getLogger(__name__)

EVALUATORS = ("xquad_r", "mlqa_r", "miracl", "mrtydi", "tydiqa", "tatoeba")
# Folder under config.data.data_dir (the ../shared/data layout) when an evaluator's data_dir is empty.
DEFAULT_SUBDIRS = {"xquad_r": "xquad-r", "mlqa_r": "mlqa-r", "miracl": "miracl", "mrtydi": "mrtydi",
                   "tatoeba": os.path.join("tatoeba", "v1")}

__all__ = ["EVALUATORS", "Embedder", "Evaluator", "build_evaluators", "flat_metrics", "format_table",
           "run_evaluators", "validate_eval_config"]


def _fail(field: str, why: str) -> None:
    from mlret.config import ConfigError  # lazy: mlret.config imports this package inside validate()

    raise ConfigError(f"config.{field}: {why}")


def validate_eval_config(config: Any) -> None:
    """Check config.eval (and checkpoint.best_metric's evaluator) before any device work."""
    ev = config.eval
    names = parse_list(ev.evaluators)
    for n in names:
        if n not in EVALUATORS:
            _fail("eval.evaluators", f"{n!r} is not one of {', '.join(EVALUATORS)}")
    if ev.batch_size <= 0:
        _fail("eval.batch_size", "must be positive")
    if ev.every < 0:
        _fail("eval.every", "must be >= 0 (0: no evaluation during training)")
    if ev.every > 0 and not names:
        _fail("eval.evaluators", "empty although eval.every > 0; name at least one evaluator")
    if ev.retrieval.method not in ("auto", "exact", "scann"):
        _fail("eval.retrieval.method", f"{ev.retrieval.method!r} is not one of auto, exact, scann")
    if ev.retrieval.reorder_dtype not in REORDER_DTYPES:
        _fail("eval.retrieval.reorder_dtype",
              f"{ev.retrieval.reorder_dtype!r} is not one of {', '.join(REORDER_DTYPES)}")
    if ev.retrieval.corpus_dtype not in ("float32", "bfloat16", "float16"):
        _fail("eval.retrieval.corpus_dtype", f"{ev.retrieval.corpus_dtype!r} is not one of float32, bfloat16, float16")
    if not 0.0 <= ev.retrieval.recall_floor <= 1.0:
        _fail("eval.retrieval.recall_floor", f"{ev.retrieval.recall_floor} is not in [0, 1]")
    if ev.retrieval.rank_k < 1:
        _fail("eval.retrieval.rank_k", "must be positive")
    if ev.retrieval.scann_threshold < 1:
        _fail("eval.retrieval.scann_threshold", "must be positive")
    for name in ("xquad_r", "mlqa_r"):
        sec = ev[name]
        if sec.candidate_context not in ("none", "paragraph"):
            _fail(f"eval.{name}.candidate_context", f"{sec.candidate_context!r} is not none or paragraph")
        settings = parse_list(sec.settings)
        if not settings or any(s not in SETTINGS for s in settings):
            _fail(f"eval.{name}.settings", f"{sec.settings!r} must be a non-empty subset of {','.join(SETTINGS)}")
        known = XQUAD_R_LANGUAGES if name == "xquad_r" else MLQA_R_LANGUAGES
        for lang in parse_list(sec.languages):
            if lang not in known:
                _fail(f"eval.{name}.languages", f"{lang!r} is not one of {','.join(known)}")
    for name in ("miracl", "mrtydi"):
        sec = ev[name]
        if sec.top_k < 100:
            _fail(f"eval.{name}.top_k", f"{sec.top_k} < 100 cannot give Recall@100 / MRR@100")
        if name in names and not sec.corpus:
            _fail(f"eval.{name}.corpus", "empty; name the corpus jsonl (a path with {lang})")
    if ev.tydiqa.candidates not in ("article", "language"):
        _fail("eval.tydiqa.candidates", f"{ev.tydiqa.candidates!r} is not article or language")
    if "tydiqa" in names and not ev.tydiqa.path:
        _fail("eval.tydiqa.path", "empty; name a TyDi QA primary-task jsonl(.gz)")
    if ev.tatoeba.encode_as not in ("query", "passage"):
        _fail("eval.tatoeba.encode_as", f"{ev.tatoeba.encode_as!r} is not query or passage")
    best = config.checkpoint.best_metric if "checkpoint" in config else ""
    if best:
        head, _, key = best.partition("/")
        if not key or head not in names:
            _fail("checkpoint.best_metric", f"{best!r} must be '<evaluator>/<summary key>' with the evaluator in "
                                            f"config.eval.evaluators ({','.join(names) or 'empty'})")


def _data_dir(config: Any, name: str) -> str:
    sec = config.eval[name]
    if sec.data_dir:
        return sec.data_dir
    if not config.data.data_dir:
        _fail(f"eval.{name}.data_dir", "empty and config.data.data_dir is unset; point one of them at the data "
                                       "(the ../shared/data layout)")
    return os.path.join(config.data.data_dir, DEFAULT_SUBDIRS[name])


def build_evaluators(config: Any, names: Sequence[str] | None = None) -> list[Evaluator]:
    """The evaluators named in config.eval.evaluators (or `names`), configured from their config.eval sections."""
    validate_eval_config(config)
    ev = config.eval
    retrieval = RetrievalOptions.from_config(ev.retrieval)
    out: list[Evaluator] = []
    for name in parse_list(ev.evaluators) if names is None else list(names):
        if name in ("xquad_r", "mlqa_r"):
            sec = ev[name]
            default = XQUAD_R_LANGUAGES if name == "xquad_r" else MLQA_R_LANGUAGES
            out.append(LareqaEvaluator(
                name, _data_dir(config, name), parse_list(sec.languages) or default,
                candidate_context=sec.candidate_context, context_separator=sec.context_separator,
                max_paragraphs=sec.max_paragraphs, map_k=sec.map_k, settings=parse_list(sec.settings),
                plots=ev.plots, retrieval=retrieval))
        elif name in ("miracl", "mrtydi"):
            sec = ev[name]
            default = MIRACL_LANGUAGES if name == "miracl" else MRTYDI_LANGUAGES
            out.append(TrecEvaluator(
                name, name, _data_dir(config, name), sec.corpus, parse_list(sec.languages) or default,
                split=sec.split, top_k=sec.top_k, max_queries=sec.max_queries,
                passage_template=sec.passage_template, retrieval=retrieval))
        elif name == "tydiqa":
            sec = ev.tydiqa
            langs = parse_list(sec.languages)
            unknown = [x for x in langs if x not in TYDI_LANGUAGES.values()]
            if unknown:
                _fail("eval.tydiqa.languages", f"{unknown} are not TyDi QA languages "
                                               f"({','.join(TYDI_LANGUAGES.values())})")
            out.append(TydiQAEvaluator(name, sec.path, languages=langs, candidates=sec.candidates,
                                       mrr_k=sec.mrr_k, max_examples=sec.max_examples, min_votes=sec.min_votes,
                                       retrieval=retrieval))
        elif name == "tatoeba":
            sec = ev.tatoeba
            out.append(TatoebaEvaluator(name, _data_dir(config, name), parse_list(sec.languages),
                                        max_sentences=sec.max_sentences, encode_as=sec.encode_as))
        else:
            _fail("eval.evaluators", f"{name!r} is not one of {', '.join(EVALUATORS)}")
    return out


def run_evaluators(evaluators: Sequence[Evaluator], embedder: Embedder, step: int | None = None,
                   output_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """Run each evaluator; returns {name: block}, each block with a flat `summary`, `step` and `seconds`.

    Every host must call this with the same evaluators (the sharded embedder steps all hosts together); the
    matrices and heatmaps are written by process 0 only when `output_dir` is given.
    """
    results: dict[str, dict[str, Any]] = {}
    write = output_dir if output_dir and _process_index() == 0 else None
    for ev in evaluators:
        t0 = time.perf_counter()
        block = ev.run(embedder, write)
        block["seconds"] = time.perf_counter() - t0
        block["step"] = step
        results[ev.name] = block
        log.info("eval %s%s: %s (%.1f s)", ev.name, "" if step is None else f" at step {step}",
                 ", ".join(f"{k}={v:.4f}" for k, v in block["summary"].items()), block["seconds"])
    return results


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"<evaluator>/<summary key>": value} over all evaluators (what training logs and best_metric names)."""
    return {f"{name}/{k}": float(v) for name, block in results.items() for k, v in block["summary"].items()}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one block per evaluator, one line per summary metric."""
    lines = []
    for name, block in results.items():
        lines.append(f"{name}" + (f"  (step {block['step']})" if block.get("step") is not None else ""))
        for k, v in block["summary"].items():
            lines.append(f"  {k:<24} {'nan' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4f}'}")
    return "\n".join(lines)


def _process_index() -> int:
    import sys

    jax = sys.modules.get("jax")  # no jax import just for this: single-process runs without jax are process 0
    return int(jax.process_index()) if jax is not None else 0
