"""Nearest-neighbour search behind one interface: exact (chunked matrix products) or ScaNN, by pool size.

Scores are dot products of float32 embeddings (the model decides whether they are normalised). Everything here
runs on the host in numpy, so results do not depend on the accelerator's matmul precision (TF32 on GPUs, bf16
passes on TPUs) and are comparable between runs and machines.

* `ExactIndex.search` returns the top k of every query by chunked `queries @ candidates.T`; ties are broken by
  candidate index (lower first), so the result is deterministic.
* `ScannIndex.search` builds a ScaNN searcher (k-means tree, spherical for normalised embeddings, + anisotropic
  asymmetric hashing + reordering). A result is never padding: ScaNN fills a query that reached fewer than k
  candidates with index 0 and a NaN score; those slots become index -1 / score -inf, the query is searched again
  on more leaves (doubling up to all of them), and one still short is counted (`info["short_queries"]`). Every
  candidate found is re-scored exactly in float32 from the candidates (whatever the reordering copy's dtype) and
  the list sorted by (score desc, index asc), so each list equals exact search on the candidates it holds. The
  scann builder takes no seed, and the same embeddings and options give slightly different neighbours in
  different processes (identical within one).
* Defaults follow the pool size n (`scann_shape`): about sqrt(n) leaves; max(200, 10 k) candidates reordered
  (re-scored exactly); leaves searched holding on average at least four times that many, and at least a tenth of
  the leaves. A pool of a few thousand is then searched whole and reordered whole (exact but for the tree's
  cost); the tree prunes only where the top k is a small share of the pool.
* `PerLanguageIndex` (option `per_language_index`) builds one index per candidate language, searches each for the
  top k and merges them. A single tree over a multilingual pool has leaves that follow the language of the text
  (docs/benchmarks.md), so searching a tenth of the leaves drops most relevant candidates in the other
  languages; one index per language cannot drop a language. Asked for without the candidates' languages, it is
  an error, never ignored.
* Lists are [Q, k] arrays padded with index -1 and score -inf where a query has fewer than k results (a pool
  smaller than k, or ScaNN's misses); `TopK.found` counts each query's real entries.
* `build_index(candidates, RetrievalOptions)` picks exact search up to `scann_threshold` candidates and ScaNN
  above it (per language when asked and the languages are given); `search_topk` also measures the approximate
  index's recall@k against exact search on a sample of queries (overall and per candidate language), logs it,
  and gates on it: below `recall_floor` the search is done again exactly (`on_low_recall="exact"`, the default)
  or fails (`"fail"`), and says so. `search_summary` turns the searches' info into the summary keys the
  evaluators report (`search_recall_min`, `search_exact_fallbacks`, `search_short_queries`).
* `merge_topk` merges top-k lists of disjoint candidate sets (languages, or the shards of `mlret.eval.sharded`)
  into the top k of their union, with the same tie rule.
* `relevant_ranks` gives the exact 1-based rank of every relevant candidate in the *full* ranking (1 + the
  number of candidates scoring higher + the number tying with a smaller tie key), which AP over the full ranking
  and the rank distance need; a truncated top-k cannot give them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

REORDER_DTYPES = ("float32", "bfloat16", "int8")
SPHERICAL = ("auto", "true", "false")
ON_LOW_RECALL = ("exact", "fail")

# Score-matrix elements held at once (float32: 128 MiB); the comparison masks in relevant_ranks add as much.
DEFAULT_CHUNK_ELEMENTS = 2**25


@dataclasses.dataclass(frozen=True)
class RetrievalOptions:
    """How to search; mirrors `config.eval.retrieval` (see `from_config`)."""

    method: str = "auto"  # auto | exact | scann
    scann_threshold: int = 1_000_000  # auto: exact search up to this many candidates, ScaNN above
    num_leaves: int = 0  # ScaNN tree leaves; 0: about sqrt(pool size) (`scann_shape`)
    leaves_to_search: int = 0  # 0: from the pool size, so that k candidates are reachable (`scann_shape`)
    reorder: int = 0  # candidates re-scored exactly; 0: max(200, 10 k)
    reorder_dtype: str = "float32"  # ScaNN's copy for re-scoring: float32 | bfloat16 | int8 (final k: float32)
    spherical: str = "auto"  # spherical k-means tree: auto (when the candidates are unit vectors) | true | false
    per_language_index: bool = False  # one index per candidate language, searched each and merged
    training_sample_size: int = 250_000
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    recall_sample: int = 1000  # queries on which ScaNN recall@k against exact search is measured; 0: skip
    recall_floor: float = 0.95  # a measured recall below it: a warning, and the on_low_recall action
    on_low_recall: str = "exact"  # below recall_floor: exact (search again exactly) | fail (stop with an error)
    rank_with_index: bool = False  # LAReQA / TyDi QA: ranks from the index's top k instead of the full ranking
    rank_k: int = 100  # rank_with_index: length of the searched list (relevant items beyond it: unranked)
    corpus_dtype: str = "float32"  # corpus embeddings kept per host (mlret.eval.sharded): float32|bfloat16|float16
    seed: int = 0
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    @classmethod
    def from_config(cls, cfg) -> RetrievalOptions:
        """From the `config.eval.retrieval` ConfigDict (or any mapping with these field names)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(cfg).items() if k in fields}
        return cls(**values)


@dataclasses.dataclass
class TopK:
    """Search result: candidate indices and scores, [Q, k], best first, padded with index -1 and score -inf
    where a query has fewer than k results. `info` says how it was found."""

    indices: np.ndarray
    scores: np.ndarray
    info: dict

    @property
    def found(self) -> np.ndarray:
        """[Q] int: how many real results each query has (the padding is at the end of its row)."""
        return (self.indices >= 0).sum(axis=1)


class RecallError(RuntimeError):
    """Approximate search whose measured recall against exact search is below the floor (on_low_recall=fail)."""


def rescore(queries: np.ndarray, candidates: np.ndarray, indices: np.ndarray,
            rows_per_chunk: int = 1024) -> np.ndarray:
    """[Q, k] float32 exact scores of the listed candidates (-inf where the index is -1), in chunks of queries so
    that the gathered [rows, k, D] candidates stay small."""
    out = np.full(indices.shape, -np.inf, dtype=np.float32)
    for s in range(0, len(indices), rows_per_chunk):
        idx = indices[s:s + rows_per_chunk]
        got = candidates[np.maximum(idx, 0)].astype(np.float32, copy=False)
        val = np.einsum("qd,qkd->qk", queries[s:s + rows_per_chunk], got)
        out[s:s + rows_per_chunk] = np.where(idx >= 0, val, -np.inf)
    return out


def check_embeddings(x: np.ndarray, what: str, low_precision: bool = False) -> np.ndarray:
    """x as a C-contiguous [N, D] float32 array of finite values (`low_precision`: float16 / bfloat16 kept as
    they are, for a pool that is cast tile by tile)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be [N, D], got shape {x.shape}")
    if x.dtype != np.float32 and not (low_precision and x.dtype.name in ("float16", "bfloat16")):
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{what}: {bad} of {len(x)} embeddings contain NaN or inf (check the model / checkpoint)")
    return np.ascontiguousarray(x)


def _rows_per_chunk(n_cols: int, factor: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, n_cols * factor))


def _sort_desc(indices: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score descending, then index ascending."""
    order = np.lexsort((indices, -scores.astype(np.float64)), axis=-1)
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(scores, order, axis=1)


def exact_topk_scores(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of each row of a score matrix [b, N], ties broken by column index (lower first)."""
    b, n = scores.shape
    k = min(k, n)
    if k == n:
        idx = np.broadcast_to(np.arange(n), (b, n)).copy()
        return _sort_desc(idx, scores.copy())
    # argpartition finds a top-k set, but picks arbitrarily among candidates tying with the k-th score. Where
    # more candidates reach the k-th score than fit, take the tied ones in index order instead.
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, idx, axis=1).min(axis=1)
    ambiguous = np.nonzero((scores >= kth[:, None]).sum(axis=1) > k)[0]
    if len(ambiguous):
        sub, t = scores[ambiguous], kth[ambiguous][:, None]
        above, at = sub > t, sub == t
        need = k - above.sum(axis=1)
        take = above | (at & (np.cumsum(at, axis=1) <= need[:, None]))
        idx[ambiguous] = np.nonzero(take)[1].reshape(len(ambiguous), k)
    return _sort_desc(idx, np.take_along_axis(scores, idx, axis=1))


def merge_topk(indices: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of the union of several [Q, k_i] top-k lists over disjoint candidate sets (global indices), by
    score descending, then index ascending: since each list holds its set's best, the union's best k are among
    them. Exact for ties too when each list broke its ties by global index (a set whose rows are in ascending
    global order, as languages and shards are). Padding (index -1, score -inf) sorts last and stays padding."""
    idx, val = _sort_desc(np.concatenate(indices, axis=1), np.concatenate(scores, axis=1))
    return idx[:, :k], val[:, :k]


class ExactIndex:
    """Exact maximum-inner-product search over a candidate matrix, chunked over queries."""

    method = "exact"

    def __init__(self, candidates: np.ndarray, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        self.candidates = check_embeddings(candidates, "candidate embeddings", low_precision=True)
        self.chunk_elements = chunk_elements

    def __len__(self) -> int:
        return len(self.candidates)

    def search(self, queries: np.ndarray, k: int) -> TopK:
        queries = check_embeddings(queries, "query embeddings")
        n = len(self.candidates)
        k = min(k, n)
        idx = np.empty((len(queries), k), dtype=np.int64)
        val = np.empty((len(queries), k), dtype=np.float32)
        # Tiles of (query rows x candidate columns) within the element budget. For large pools, many query rows
        # per tile so that the candidate matrix is streamed from memory once per row block, not once per query.
        if n * 1024 <= self.chunk_elements:
            rows, cols = max(1, self.chunk_elements // n), n
        else:
            rows, cols = 1024, max(k, self.chunk_elements // 1024)
        for start in range(0, len(queries), rows):
            stop = min(start + rows, len(queries))
            best_i = best_v = None
            for c0 in range(0, n, cols):
                s = queries[start:stop] @ self.candidates[c0:c0 + cols].astype(np.float32, copy=False).T
                i, v = exact_topk_scores(s, k)
                i += c0
                # The global top k (by score desc, index asc) is the top k of the tiles' top k.
                best_i, best_v = (i, v) if best_i is None else merge_topk([best_i, i], [best_v, v], k)
            idx[start:stop], val[start:stop] = best_i, best_v
        return TopK(idx, val, {"method": "exact", "pool": n})


def scann_shape(n: int, k: int, opts: RetrievalOptions) -> tuple[int, int, int]:
    """(num_leaves, leaves_to_search, reorder) for a pool of n candidates and top k, each from `opts` when set:
    about sqrt(n) leaves; max(200, 10 k) candidates reordered; leaves searched so that they hold on average at
    least four times the reordered candidates, and at least a tenth of the leaves (all of them for pools of a few
    thousand). Measured against exact search in docs/benchmarks.md ("ScaNN inside the evaluators")."""
    reorder = opts.reorder or max(200, 10 * k)
    num_leaves = opts.num_leaves or max(1, int(round(math.sqrt(n))))
    num_leaves = min(num_leaves, n)
    reach = math.ceil(4 * reorder * num_leaves / max(n, 1))
    leaves_to_search = opts.leaves_to_search or max(1, math.ceil(num_leaves / 10), reach)
    return num_leaves, min(leaves_to_search, num_leaves), reorder


def is_unit_norm(x: np.ndarray, tol: float = 1e-3) -> bool:
    """Whether every row of x has L2 norm 1 within `tol` (normalised embeddings)."""
    return bool(len(x)) and bool(np.all(np.abs(np.linalg.norm(x, axis=1) - 1.0) <= tol))


class ScannIndex:
    """ScaNN searcher: k-means tree (spherical for unit vectors), anisotropic asymmetric hashing, reordering; the
    final lists re-scored exactly, never padded with ScaNN's fill (see the module docstring)."""

    method = "scann"

    def __init__(self, candidates: np.ndarray, k: int, opts: RetrievalOptions):
        import scann  # lazy: optional and heavy (only large pools need it)

        self.candidates = check_embeddings(candidates, "candidate embeddings")
        n = len(self.candidates)
        self.k = min(k, n)
        self.num_leaves, self.leaves_to_search, self.reorder = scann_shape(n, self.k, opts)
        sample = min(n, opts.training_sample_size)
        self.reorder_dtype = opts.reorder_dtype
        spherical = opts.spherical == "true" or (opts.spherical == "auto" and is_unit_norm(self.candidates))
        self.params = {"num_leaves": self.num_leaves, "leaves_to_search": self.leaves_to_search,
                       "reorder": self.reorder, "reorder_dtype": self.reorder_dtype, "training_sample_size": sample,
                       "spherical": spherical, "dims_per_block": opts.dims_per_block,
                       "anisotropic_quantization_threshold": opts.anisotropic_quantization_threshold}
        self.searcher = (
            scann.scann_ops_pybind.builder(self.candidates, self.k, "dot_product")
            .tree(num_leaves=self.num_leaves, num_leaves_to_search=self.leaves_to_search,
                  training_sample_size=sample, spherical=spherical)
            .score_ah(opts.dims_per_block,
                      anisotropic_quantization_threshold=opts.anisotropic_quantization_threshold)
            .reorder(self.reorder, quantize=_reorder_type(self.reorder_dtype))
            .build()
        )

    def __len__(self) -> int:
        return len(self.candidates)

    def _raw(self, queries: np.ndarray, k: int, leaves: int, reorder: int) -> np.ndarray:
        """ScaNN's [Q, k] indices, -1 where it padded (its fill: index 0 with a NaN score)."""
        idx, val = self.searcher.search_batched_parallel(queries, final_num_neighbors=k,
                                                         pre_reorder_num_neighbors=reorder,
                                                         leaves_to_search=leaves)
        idx = np.asarray(idx, dtype=np.int64)
        if idx.shape != (len(queries), k):
            raise RuntimeError(f"ScaNN returned shape {idx.shape} for {len(queries)} queries and k={k}")
        return np.where(np.isfinite(np.asarray(val, dtype=np.float32)), idx, -1)

    def search(self, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
               reorder: int | None = None) -> TopK:
        """Top k per query; `leaves_to_search` / `reorder` override the build-time values for this call. A query
        that reaches fewer than k candidates is searched again on twice the leaves, up to all of them; the final
        lists are re-scored in float32 from the candidates and sorted (score desc, index asc)."""
        queries = check_embeddings(queries, "query embeddings")
        k = min(k, len(self.candidates))
        leaves = leaves_to_search or self.leaves_to_search
        reorder = reorder or self.reorder
        idx = self._raw(queries, k, leaves, reorder)
        short = np.flatnonzero((idx < 0).any(axis=1))
        retried, wider = len(short), leaves
        while len(short) and wider < self.num_leaves:
            wider = min(2 * wider, self.num_leaves)
            again = self._raw(queries[short], k, wider, max(reorder, k))
            better = (again >= 0).sum(axis=1) > (idx[short] >= 0).sum(axis=1)
            idx[short[better]] = again[better]
            short = short[(idx[short] < 0).any(axis=1)]
        val = rescore(queries, self.candidates, idx)
        idx, val = _sort_desc(idx, val)
        idx[~np.isfinite(val)] = -1  # padding sorted last stays padding
        info = {"method": "scann", "pool": len(self.candidates), **self.params}
        info.update(leaves_to_search=leaves, reorder=reorder, retried_queries=retried,
                    short_queries=len(short))
        if len(short):
            log.warning("ScaNN found fewer than %d candidates for %d of %d queries even on all %d leaves",
                        k, len(short), len(queries), self.num_leaves)
        return TopK(idx, val, info)


def _reorder_type(dtype: str):
    from scann.scann_ops.py.scann_builder import ReorderType  # lazy: optional (scann)

    return {"float32": ReorderType.FLOAT32, "bfloat16": ReorderType.BFLOAT16, "int8": ReorderType.INT8}[dtype]


class PerLanguageIndex:
    """One index per candidate language (`build_index` on that language's rows: exact or ScaNN by its own size,
    ScaNN's leaves about sqrt of the language's pool), each searched for the top k and merged (`merge_topk`)."""

    method = "per_language"

    def __init__(self, candidates: np.ndarray, languages: Sequence[str], k: int, opts: RetrievalOptions):
        self.candidates = check_embeddings(candidates, "candidate embeddings")
        languages = np.asarray(languages)
        if languages.shape != (len(self.candidates),):
            raise ValueError(f"one language per candidate: {languages.shape} for {len(self.candidates)} candidates")
        self.languages = languages
        sub_opts = dataclasses.replace(opts, per_language_index=False)
        self.parts: list[tuple[str, np.ndarray, ExactIndex | ScannIndex]] = []
        for lang in dict.fromkeys(languages.tolist()):  # in order of first appearance
            rows = np.flatnonzero(languages == lang)
            contiguous = rows[-1] - rows[0] + 1 == len(rows)
            sub = self.candidates[rows[0]:rows[-1] + 1] if contiguous else self.candidates[rows]  # a view if it can
            self.parts.append((lang, rows, build_index(sub, k, sub_opts)))

    def __len__(self) -> int:
        return len(self.candidates)

    def search(self, queries: np.ndarray, k: int, **overrides) -> TopK:
        """Top k per query over all languages; `overrides` (leaves_to_search, reorder) go to every ScaNN part."""
        queries = check_embeddings(queries, "query embeddings")
        k = min(k, len(self.candidates))
        indices, scores, info = [], [], {}
        for lang, rows, index in self.parts:
            top = index.search(queries, k, **overrides) if index.method == "scann" else index.search(queries, k)
            indices.append(np.where(top.indices >= 0, rows[np.maximum(top.indices, 0)], -1))
            scores.append(top.scores)
            info[lang] = top.info
        idx, val = merge_topk(indices, scores, k)
        short = int((idx < 0).any(axis=1).sum())
        return TopK(idx, val, {"method": "per_language", "pool": len(self.candidates), "languages": info,
                               "short_queries": short})


def build_index(candidates: np.ndarray, k: int, opts: RetrievalOptions | None = None,
                languages: Sequence[str] | None = None):
    """Exact search up to `opts.scann_threshold` candidates (or when method == "exact"), ScaNN above; with
    `opts.per_language_index`, one such index per language of the candidates' `languages` (`PerLanguageIndex`;
    without them, an error: the option is never ignored)."""
    opts = opts or RetrievalOptions()
    if opts.per_language_index:
        if languages is None:
            raise ValueError("config.eval.retrieval.per_language_index is set but this search was given no "
                             "candidate languages")
        return PerLanguageIndex(candidates, languages, k, opts)
    use_scann = opts.method == "scann" or (opts.method == "auto" and len(candidates) > opts.scann_threshold)
    if use_scann:
        return ScannIndex(candidates, k, opts)
    return ExactIndex(candidates, opts.chunk_elements)


def found_in(approx: np.ndarray, exact: np.ndarray, rows_per_chunk: int = 1024) -> np.ndarray:
    """[Q, k] bool: whether each entry of the exact top-k lists is in the approximate list of the same query."""
    out = np.empty(exact.shape, dtype=bool)
    for s in range(0, len(exact), rows_per_chunk):
        e, a = exact[s:s + rows_per_chunk], approx[s:s + rows_per_chunk]
        out[s:s + rows_per_chunk] = (e[:, :, None] == a[:, None, :]).any(axis=2)
    return out


def topk_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k, from two [Q, k] index arrays."""
    return float(found_in(approx, exact).mean())


def recall_by_language(approx: np.ndarray, exact: np.ndarray, languages: Sequence[str]) -> dict[str, float]:
    """Per candidate language: of the exact top-k entries in that language (over all queries), the share the
    approximate lists also hold. A language absent from every exact list is left out."""
    found = found_in(approx, exact)
    lang = np.asarray(languages)[exact]
    return {str(x): float(found[lang == x].mean()) for x in dict.fromkeys(np.asarray(languages).tolist())
            if (lang == x).any()}


def recall_against_exact(index, queries: np.ndarray, k: int, sample: int, seed: int = 0,
                         languages: Sequence[str] | None = None) -> dict[str, object]:
    """Recall@k of the index against exact search on a seeded sample of queries: {"recall", "queries"} and, with
    the candidates' `languages`, "by_language" (`recall_by_language`) and its minimum "min_language"."""
    rng = np.random.default_rng(seed)
    n = min(sample, len(queries))
    pick = np.sort(rng.choice(len(queries), size=n, replace=False))
    approx = index.search(queries[pick], k).indices
    exact = ExactIndex(index.candidates).search(queries[pick], k).indices
    out: dict[str, object] = {"recall": topk_recall(approx, exact), "queries": n}
    if languages is not None:
        out["by_language"] = recall_by_language(approx, exact, languages)
        out["min_language"] = min(out["by_language"].values())
    return out


def is_approximate(index) -> bool:
    """Whether an index (exact, ScaNN or per language) may miss a candidate of the exact top k."""
    if isinstance(index, PerLanguageIndex):
        return any(is_approximate(part) for _, _, part in index.parts)
    return index.method == "scann"


def warn_low_recall(recall: float, opts: RetrievalOptions, name: str, k: int) -> bool:
    """Whether a measured recall@k against exact search is below `opts.recall_floor`: then log a warning saying
    what happens next (`opts.on_low_recall`: exact search, or `RecallError`)."""
    if recall >= opts.recall_floor:
        return False
    what = f"{name or 'search'}: approximate search recall@{k} against exact search is {recall:.4f}, below " \
           f"config.eval.retrieval.recall_floor={opts.recall_floor:.3f}"
    if opts.on_low_recall == "fail":
        raise RecallError(f"{what} (config.eval.retrieval.on_low_recall=fail): raise "
                          "config.eval.retrieval.leaves_to_search / reorder, or set per_language_index for a "
                          "multilingual pool")
    log.warning("%s: searching again exactly (config.eval.retrieval.on_low_recall=exact); raise "
                "leaves_to_search / reorder (or per_language_index for a multilingual pool) to keep ScaNN", what)
    return True


def search_topk(queries: np.ndarray, candidates: np.ndarray, k: int,
                opts: RetrievalOptions | None = None, name: str = "",
                languages: Sequence[str] | None = None) -> TopK:
    """Top k candidates per query with the index the options pick (`build_index`; `languages`: the candidates'
    language, for the per-language index and the per-language recall). For an approximate index, recall@k
    against exact search on `opts.recall_sample` queries is measured, logged and returned in
    `info["recall_vs_exact"]` (and `info["recall_by_language"]` when the languages are given); below
    `opts.recall_floor` (overall or in a language) the search is done again exactly (`info["fallback"]` holds the
    approximate search's info) or raises `RecallError`, as `opts.on_low_recall` says."""
    opts = opts or RetrievalOptions()
    queries = check_embeddings(queries, "query embeddings")
    index = build_index(candidates, k, opts, languages)
    out = index.search(queries, k)
    if is_approximate(index) and opts.recall_sample > 0:
        rec = recall_against_exact(index, queries, k, opts.recall_sample, opts.seed, languages)
        out.info["recall_vs_exact"] = rec["recall"]
        out.info["recall_sample"] = rec["queries"]
        if "by_language" in rec:
            out.info["recall_by_language"] = rec["by_language"]
        log.info("%s: %s recall@%d against exact search on %d queries: %.4f (pool %d)", name or "search",
                 "ScaNN" if index.method == "scann" else "per-language index", k, rec["queries"], rec["recall"],
                 len(candidates))
        if warn_low_recall(min(rec["recall"], rec.get("min_language", 1.0)), opts, name, k):
            exact = ExactIndex(index.candidates, opts.chunk_elements).search(queries, k)
            exact.info["fallback"] = out.info
            return exact
    return out


def search_summary(infos: Sequence[dict]) -> dict[str, float]:
    """The summary keys of an evaluator's searches (their `TopK.info`s): `search_recall_min` (the worst measured
    recall of an approximate search against exact search, overall or in a language, fallbacks included),
    `search_exact_fallbacks` (searches done again exactly below the floor) and `search_short_queries` (queries
    left with fewer than k results by an approximate index); only the keys that apply."""
    recalls, fallbacks, short = [], 0, 0
    for info in infos:
        approx = info.get("fallback", info)
        fallbacks += "fallback" in info
        if "recall_vs_exact" in approx:
            recalls.append(min([approx["recall_vs_exact"], *approx.get("recall_by_language", {}).values()]))
        if approx.get("method") != "exact" and "fallback" not in info:
            short += _short(approx)
    out: dict[str, float] = {}
    if recalls:
        out["search_recall_min"] = min(recalls)
        out["search_exact_fallbacks"] = fallbacks
        out["search_short_queries"] = short
    return out


def _short(info: dict) -> int:
    if "short_queries" in info:
        return int(info["short_queries"])
    return sum(_short(part) for part in info.get("languages", {}).values())


def describe_search(infos: Sequence[dict]) -> str:
    """One line naming the index that ran (for the printed summary and the JSON details)."""
    kinds = []
    for info in infos:
        method = info.get("method", "exact")
        if method == "per_language":
            parts = info.get("languages", {})
            inner = sorted({p.get("method", "exact") for p in parts.values()})
            text = f"one index per language ({len(parts)}: {'/'.join(inner)})"
        elif method == "scann":
            text = f"ScaNN ({info.get('num_leaves')} leaves, {info.get('leaves_to_search')} searched" \
                   f"{', spherical' if info.get('spherical') else ''})"
        else:
            text = "exact"
        if "fallback" in info:
            text = f"exact (fell back from {describe_search([info['fallback']])}: recall below the floor)"
        kinds.append(text)
    return "; ".join(dict.fromkeys(kinds)) or "exact"


def topk_positions(indices: np.ndarray, relevant: Sequence[Sequence[int]]) -> np.ndarray:
    """1-based positions of each query's relevant candidates in its top-k list, float64 [Q, R_max], each row
    sorted ascending, inf where a relevant candidate is not in the list (and as padding)."""
    width = max((len(r) for r in relevant), default=1) or 1
    out = np.full((len(relevant), width), np.inf)
    for qi, rel in enumerate(relevant):
        pos = {int(c): j + 1 for j, c in enumerate(indices[qi]) if c >= 0}
        out[qi, : len(rel)] = [pos.get(int(r), np.inf) for r in rel]
    return np.sort(out, axis=1)


def index_ranks(opts: RetrievalOptions, name: str = "", log_info: dict | None = None):
    """A ranker with `relevant_ranks`' signature (queries, candidates, relevant, languages=None) that ranks
    through the index the options pick (`search_topk` of `opts.rank_k`): relevant candidates outside the list
    are unranked (inf), so the metrics are those of the truncated ranking. The search info (recall against exact
    search included) is appended to `log_info[name]` when given."""

    def rank(queries, candidates, relevant, languages=None) -> np.ndarray:
        top = search_topk(queries, candidates, opts.rank_k, opts, name=name, languages=languages)
        if log_info is not None:
            log_info.setdefault(name, []).append(top.info)
        return topk_positions(top.indices, relevant)

    return rank


def full_ranks(queries, candidates, relevant, languages=None) -> np.ndarray:
    """`relevant_ranks` as a ranker (the exact full ranking; languages play no part)."""
    return relevant_ranks(queries, candidates, relevant)


def relevant_ranks(queries: np.ndarray, candidates: np.ndarray, relevant: Sequence[Sequence[int]],
                   tie_key: np.ndarray | None = None,
                   chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> np.ndarray:
    """Exact 1-based rank of each relevant candidate of each query in the full ranking of `candidates`.

    Ranking is by score descending; ties are broken by `tie_key` ascending (default: the candidate index), so
    the rank of relevant item r is 1 + #(score > s_r) + #(score == s_r and key < key_r). The relevant item's own
    score is read from the same score matrix as the others, so it ties with itself exactly.

    Returns float64 [Q, R_max], each row sorted ascending and padded with inf.
    """
    queries = check_embeddings(queries, "query embeddings")
    candidates = check_embeddings(candidates, "candidate embeddings")
    n = len(candidates)
    if len(relevant) != len(queries):
        raise ValueError(f"{len(relevant)} relevant lists for {len(queries)} queries")
    width = max((len(r) for r in relevant), default=1) or 1
    out = np.full((len(queries), width), np.inf)
    key = np.arange(n) if tie_key is None else np.asarray(tie_key)
    if key.shape != (n,):
        raise ValueError(f"tie_key must have one entry per candidate ({n}), got shape {key.shape}")
    padded = np.full((len(queries), width), -1, dtype=np.int64)  # -1: no relevant item in this slot
    for qi, rel in enumerate(relevant):
        rel = np.asarray(rel, dtype=np.int64)
        if rel.size and (rel.min() < 0 or rel.max() >= n):
            raise IndexError(f"query {qi}: relevant candidates {rel.tolist()} reach outside the pool of {n}")
        padded[qi, : len(rel)] = rel
    rows = _rows_per_chunk(n, 3, chunk_elements)
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        s = queries[start:stop] @ candidates.T
        # One relevant slot at a time, so that the comparisons run on the score matrix itself (no row copies).
        for j in range(width):
            cand = padded[start:stop, j]
            has = cand >= 0
            if not has.any():
                continue
            sub = s if has.all() else s[has]
            c = cand[has]
            s_rel = sub[np.arange(len(c)), c][:, None]
            higher = (sub > s_rel).sum(axis=1)
            equal = (sub == s_rel).sum(axis=1)
            rank = 1 + higher
            tied = np.nonzero(equal > 1)[0]  # rows where another candidate ties the relevant one
            if len(tied):
                before = (sub[tied] == s_rel[tied]) & (key[None, :] < key[c[tied]][:, None])
                rank[tied] += before.sum(axis=1)
            out[np.arange(start, stop)[has], j] = rank
    return np.sort(out, axis=1)
