"""Evaluation at truncated embedding dimensions (Matryoshka models): search at one dimension, report several.

- `config.eval.dim` (0: the whole embedding): every evaluator encodes as usual and searches (exact or ScaNN) on the
  first `dim` components of every embedding; this is the dimension the summary, the best checkpoint and the card's
  tables are at.
- `config.eval.dims` ("auto": the run's `config.loss.matryoshka_dims`; "": none; or "256,128,64"): each evaluator
  is run again on the first d components for every d below the searched dimension, from the same embeddings
  (encoded once per evaluator, kept while it runs); `EvalResult.by_dim` holds {d: summary} (the searched dimension
  included) and the compact table shows `config.eval.dim_metrics` by dimension.

The rule for the prefix: with `config.model.normalize` (the model's scores are cosines) the first d components
are L2-normalised again, so the scores stay cosines, as sentence-transformers gives them for
`SentenceTransformer(..., truncate_dim=d)` with cosine similarity (or `encode(..., normalize_embeddings=True)`);
without it the prefix is kept as it is (dot products, as sentence-transformers' truncation does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mlret.errors import ConfigError
from mlret.eval.base import parse_list


def truncate(x: np.ndarray, dim: int, normalize: bool, field: str = "config.eval.dim") -> np.ndarray:
    """The first `dim` components of embeddings `x` [N, D] in float32, L2-normalised again with `normalize`."""
    x = np.asarray(x)
    if dim > x.shape[-1]:
        raise ConfigError(f"{field}: {dim} exceeds the embedding size {x.shape[-1]}")
    y = np.asarray(x[..., :dim], np.float32)
    if normalize:
        y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), np.float32(1e-12))
    return y


def parse_dims(value: str, field: str) -> list[int]:
    """A comma-separated list of distinct positive dimensions; raises ConfigError naming `field`."""
    try:
        dims = [int(x) for x in parse_list(value)]
    except ValueError:
        raise ConfigError(f"{field}: {value!r} is not a comma-separated list of whole numbers (e.g. "
                          "\"256,128,64\")") from None
    if any(d <= 0 for d in dims) or len(set(dims)) != len(dims):
        raise ConfigError(f"{field}: {value!r} must be distinct positive dimensions")
    return dims


def validate(config: Any) -> None:
    """config.eval.dim / dims / dim_metrics (the sizes against the model are checked when embeddings exist)."""
    if config.eval.dim < 0:
        raise ConfigError("config.eval.dim: must be >= 0 (0: the whole embedding)")
    if config.eval.dims != "auto":
        parse_dims(config.eval.dims, "config.eval.dims")
    if not parse_list(config.eval.dim_metrics):
        raise ConfigError("config.eval.dim_metrics: empty; name the summary metrics of the by-dimension table")


def report_dims(config: Any) -> list[int]:
    """The dimensions `config.eval.dims` asks for, largest first ("auto": the run's Matryoshka dimensions)."""
    if config.eval.dims == "auto":  # the field's own parse (evaluators import nothing of the losses)
        return sorted(parse_dims(config.loss.get("matryoshka_dims", ""), "config.loss.matryoshka_dims"),
                      reverse=True)
    return sorted(parse_dims(config.eval.dims, "config.eval.dims"), reverse=True)


class Truncated:
    """An embedder giving the first `dim` components of `inner`'s embeddings (re-normalised with `normalize`), for
    every method `inner` has (`queries`, `passages` and the sharded corpus's `local_passages`)."""

    def __init__(self, inner: Any, dim: int, normalize: bool, field: str = "config.eval.dim") -> None:
        self.inner, self.dim, self.normalize, self.field = inner, int(dim), bool(normalize), field
        if hasattr(inner, "local_passages"):
            self.local_passages = self._local_passages
        if hasattr(inner, "tokenizer"):
            self.tokenizer = inner.tokenizer

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return truncate(self.inner.queries(texts), self.dim, self.normalize, self.field)

    def passages(self, texts: Sequence[str]) -> np.ndarray:
        return truncate(self.inner.passages(texts), self.dim, self.normalize, self.field)

    def _local_passages(self, texts: Sequence[str], dtype: Any = np.float32) -> np.ndarray:
        full = self.inner.local_passages(texts, dtype=np.float32)
        return truncate(full, self.dim, self.normalize, self.field).astype(dtype)


class Cached:
    """An embedder that encodes each (method, texts) once and hands back the same array afterwards: an evaluator
    run again at another dimension reuses its embeddings instead of encoding again. `width` is the embedding
    size seen (None before the first call)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.width: int | None = None
        self._cache: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
        if hasattr(inner, "local_passages"):
            self.local_passages = self._local_passages
        if hasattr(inner, "tokenizer"):
            self.tokenizer = inner.tokenizer

    def _get(self, method: str, texts: Sequence[str], fn: Any) -> np.ndarray:
        key = (method, tuple(texts))
        if key not in self._cache:
            self._cache[key] = fn()
            if self._cache[key].ndim == 2 and len(self._cache[key]):
                self.width = int(self._cache[key].shape[-1])
        return self._cache[key]

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._get("queries", texts, lambda: np.asarray(self.inner.queries(texts), np.float32))

    def passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._get("passages", texts, lambda: np.asarray(self.inner.passages(texts), np.float32))

    def _local_passages(self, texts: Sequence[str], dtype: Any = np.float32) -> np.ndarray:
        full = self._get("local_passages", texts, lambda: self.inner.local_passages(texts, dtype=np.float32))
        return full.astype(dtype, copy=False)

    def clear(self) -> None:
        self._cache.clear()


class ByDimension:
    """An evaluator run at embedding dimensions: `run` searches at `dim` (0: the whole embedding) and, with
    `dims`, runs the evaluator again on each other dimension's prefix of the same embeddings (encoded once),
    filling `EvalResult.by_dim` ({dimension: summary}, the searched one included), `dim` and `dim_metrics`.
    Every other attribute is the wrapped evaluator's (its name, its files for the pre-flight)."""

    def __init__(self, inner: Any, dim: int, dims: Sequence[int], normalize: bool,
                 dim_metrics: Sequence[str]) -> None:
        self.inner, self.dim, self.dims = inner, int(dim), tuple(int(d) for d in dims)
        self.normalize, self.dim_metrics = bool(normalize), tuple(dim_metrics)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run(self, embedder: Any, output_dir: str | None = None) -> Any:
        cache = Cached(embedder) if self.dims else None
        source = cache if cache is not None else embedder
        result = self.inner.run(Truncated(source, self.dim, self.normalize) if self.dim else source, output_dir)
        if cache is None:
            return result
        searched = self.dim or cache.width
        by_dim = {searched: dict(result.summary)}
        for d in (d for d in self.dims if d != searched):
            other = self.inner.run(Truncated(cache, d, self.normalize, "config.eval.dims"), None)
            by_dim[d], result.by_dim_per_query[d] = other.summary, other.per_query
        cache.clear()
        result.by_dim = dict(sorted(by_dim.items(), reverse=True))
        result.dim, result.dim_metrics = searched, self.dim_metrics
        return result


def wrap(evaluators: list[Any], config: Any) -> list[Any]:
    """`evaluators` as `ByDimension` when config.eval.dim or config.eval.dims asks for dimensions, else as given."""
    dim, dims = int(config.eval.dim), report_dims(config)
    if not dim and not dims:
        return evaluators
    metrics = tuple(parse_list(config.eval.dim_metrics))
    return [ByDimension(ev, dim, dims, bool(config.model.normalize), metrics) for ev in evaluators]
