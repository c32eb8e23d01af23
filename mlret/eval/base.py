"""What every evaluator shares: the embedder it is given, the result it returns, the averaging rule, and how
results are written.

Evaluators know nothing of training or of the model: they receive an `Embedder` (anything with `.queries(texts)`
and `.passages(texts)` returning float32 numpy arrays [N, D]: the sharded JAX encoder in `mlret.eval.encode`, or a
stand-in in tests) and return an `EvalResult`: a flat `summary` ({metric: float}), JSON-able `details` (per-language
tables, options, files) and the `per_query` values the summary averages (`PerQuery`, by setting), which paired
significance tests need.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mlret import storage
from mlret.errors import ConfigError

log = logging.getLogger(__name__)


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into embeddings; prefixes and truncation are the embedder's business."""

    def queries(self, texts: Sequence[str]) -> np.ndarray: ...

    def passages(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclasses.dataclass
class PerQuery:
    """Per-query values of one setting: row i is query `ids[i]` in language `languages[i]` (and, where the setting
    pairs a query language with a candidate language, against `targets[i]`); `values` maps a metric to its float64
    column. A query id names the same question in every language where the benchmark translates its questions."""

    ids: list[str]
    languages: list[str]
    values: dict[str, np.ndarray]
    targets: list[str] | None = None

    @classmethod
    def concat(cls, parts: Sequence[PerQuery]) -> PerQuery:
        """The rows of `parts` one after another (all with the same metrics)."""
        targets = [t for p in parts for t in p.targets] if parts and parts[0].targets is not None else None
        return cls(ids=[i for p in parts for i in p.ids], languages=[x for p in parts for x in p.languages],
                   values={k: np.concatenate([np.asarray(p.values[k], np.float64) for p in parts])
                           for k in (parts[0].values if parts else {})}, targets=targets)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ids": list(self.ids), "languages": list(self.languages)}
        if self.targets is not None:
            out["targets"] = list(self.targets)
        out["values"] = {k: np.asarray(v, np.float64).tolist() for k, v in self.values.items()}
        return out


@dataclasses.dataclass
class EvalResult:
    """What `Evaluator.run` returns. `summary`: flat {metric: float} (what training logs and best checkpoints
    rank by); `details`: JSON-able tables (per language, options, written files); `per_query`: the per-query values
    the summary averages, by setting. `run_evaluators` fills in `step` and `seconds`."""

    summary: dict[str, float]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    per_query: dict[str, PerQuery] = dataclasses.field(default_factory=dict)
    step: int | None = None
    seconds: float | None = None
    # {dimension: summary} when evaluated at several embedding dimensions (`mlret.eval.dims`), the searched one
    # included; `dim_metrics` are the summary keys the by-dimension table shows.
    by_dim: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    dim_metrics: tuple[str, ...] = ()
    dim: int | None = None  # the dimension searched (the summary's) when by_dim is filled
    by_dim_per_query: dict[int, dict[str, PerQuery]] = dataclasses.field(default_factory=dict)  # the others' per_query

    def block(self) -> dict[str, Any]:
        """The JSON block of `python -m mlret.evaluate --out` (summary, details, step, seconds; no per-query;
        `by_dim` {"d": summary} and `dim_metrics` when evaluated by dimension)."""
        out = {"summary": self.summary, **self.details, "step": self.step, "seconds": self.seconds}
        if self.by_dim:
            out["by_dim"] = {str(d): s for d, s in self.by_dim.items()}
            out["dim_metrics"], out["dim"] = list(self.dim_metrics), self.dim
        return out


@runtime_checkable
class Evaluator(Protocol):
    """One benchmark: `run(embedder, output_dir)` returns an `EvalResult`."""

    name: str

    def run(self, embedder: Embedder, output_dir: str | None = None) -> EvalResult: ...


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator's `validate` and `build` see besides its own config section."""

    name: str  # the evaluator's name (its section is config.eval.<name>)
    config: Any  # the whole config (read only)
    active: bool  # named in config.eval.evaluators
    data_dir: str  # config.eval.<name>.data_dir, else config.data.data_dir/<data_subdir> ("" when neither is set)

    def fail(self, field: str, why: str) -> ConfigError:
        """The error for a bad `config.eval.<name>.<field>` (raise it)."""
        return ConfigError(f"config.eval.{self.name}.{field}: {why}")


@dataclasses.dataclass(frozen=True)
class EvaluatorSpec:
    """One evaluator, everything mlret needs to know of it in one record (see `mlret.eval.registry`).

    - `defaults()`: the fields of its `config.eval.<name>` section with their defaults (a ConfigDict);
    - `validate(section, ctx)`: raise `ctx.fail(field, why)` for a bad field (called for every evaluator,
      `ctx.active` tells whether it runs);
    - `build(section, ctx)`: the evaluator (an `Evaluator`), from a validated section; reads no data yet;
    - `files(evaluator)`: the local files it will read, for the pre-flight (`mlret.preflight`), `files_field`
      the config field(s) that point at them and `origin` where their public copy comes from;
    - `data_subdir`: the folder under `config.data.data_dir` used when the section's `data_dir` is empty
      ("" when the evaluator has no `data_dir` field);
    - `protocol`: how it scores, in a sentence or two (the model card's text above its table; "" says none).
    """

    name: str
    defaults: Callable[[], Any]
    build: Callable[[Any, EvalContext], Evaluator]
    validate: Callable[[Any, EvalContext], None] = lambda section, ctx: None
    files: Callable[[Any], Sequence[str]] = lambda evaluator: ()
    files_field: str = "data_dir (default: config.data.data_dir/...)"
    origin: str = ""
    data_subdir: str = ""
    protocol: str = ""


def embed(fn, texts: Sequence[str], what: str) -> np.ndarray:
    """Call an embedder method and check that it returned one finite float32 row per text."""
    out = np.asarray(fn(list(texts)), dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != len(texts):
        raise ValueError(f"{what}: the embedder returned shape {out.shape} for {len(texts)} texts "
                         "(expected [N, D])")
    return out


def macro_mean(values: Mapping[str, float]) -> float:
    """Unweighted mean over languages (or pairs); NaN when empty."""
    vals = [v for v in values.values() if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def parse_list(value: str | Sequence[str] | None) -> list[str]:
    """A comma-separated config string (or a list) -> a list of non-empty, stripped names."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def write_json(path: str, data: Any) -> None:
    """`data` as JSON at `path` (local or gs://), written whole: a reader never sees half a file."""
    target = storage.path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, ensure_ascii=False, sort_keys=False, default=_json_default) + "\n"
    if storage.is_gcs(target):  # an object appears only when its upload completes
        target.write_text(text, encoding="utf-8")
        return
    tmp = target.parent / f"{target.name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def heatmap(path: str, matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str,
            xlabel: str = "", ylabel: str = "", fmt: str = "{:.2f}", vmin: float | None = 0.0,
            vmax: float | None = 1.0) -> None:
    """Draw a labelled, annotated heatmap PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib  # lazy: heavy (only heatmaps draw); the jax-free CLIs import this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    m = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 + 0.62 * len(cols)), max(2.4, 1.4 + 0.5 * len(rows))))
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    lo, hi = np.nanmin(m) if np.isfinite(m).any() else 0.0, np.nanmax(m) if np.isfinite(m).any() else 1.0
    mid = (vmin if vmin is not None else lo) / 2 + (vmax if vmax is not None else hi) / 2
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    target = storage.path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as f:
        fig.savefig(f, dpi=110, format=target.suffix.lstrip(".") or "png")
    plt.close(fig)


class NgramEmbedder:
    """Character n-grams hashed into `dim` buckets, L2-normalised: a model-free lexical embedder.

    Deterministic (crc32, not Python's salted hash) and quick, it gives real, imperfect rankings of real text:
    a lexical baseline, and the stand-in for a model where a test is about the protocol rather than the model.
    """

    def __init__(self, dim: int = 512, n: int = 3):
        self.dim, self.n = dim, n

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            t = f" {t.lower()} "
            grams = [zlib.crc32(t[j:j + self.n].encode("utf-8")) % self.dim for j in range(len(t) - self.n + 1)]
            np.add.at(out[i], grams, 1.0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(texts)

    def passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(texts)
