"""Ranking metrics as pure numpy functions, defined the way trec_eval defines them.

Two entry points:

* rank-based metrics (`average_precision`, `reciprocal_rank`, `recall_at_k`, `hit_at_k`, `rank_distance`) take,
  per query, the 1-based ranks of its relevant candidates in the full ranking (`np.inf` where a relevant item is
  not ranked, e.g. outside a retrieved top-k, and as padding) plus the true number of relevant items. LAReQA
  computes these ranks exactly over the whole pool (`mlret.eval.retrieval.relevant_ranks`), so AP is the AP of
  the full ranking, not of a truncated list.
* `trec_metrics(run, qrels)` evaluates a TREC-style run (`{qid: {docid: score}}`) against qrels
  (`{qid: {docid: grade}}`) like trec_eval does: documents are re-sorted by score descending with ties broken by
  docid in descending string order (trec_eval's `comp_sim_docno`), relevance means grade >= 1, nDCG gains are the
  grades with discount log2(rank + 1), and only queries present in both the run and the qrels are scored.
  `tests/test_metrics_trec.py` checks it against pytrec_eval on real rankings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def pad_ranks(rank_lists: Sequence[Sequence[float]]) -> np.ndarray:
    """Ragged per-query rank lists -> float64 [Q, R_max], padded with inf, each row sorted ascending."""
    width = max((len(r) for r in rank_lists), default=0)
    out = np.full((len(rank_lists), max(width, 1)), np.inf)
    for i, r in enumerate(rank_lists):
        out[i, : len(r)] = np.sort(np.asarray(r, dtype=np.float64))
    return out


def _as_ranks(ranks: np.ndarray) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be [queries, relevant] (padded with inf), got shape {ranks.shape}")
    finite = ranks[np.isfinite(ranks)]
    if finite.size and finite.min() < 1:
        raise ValueError(f"ranks are 1-based; got {finite.min()}")
    return np.sort(ranks, axis=1)


def average_precision(ranks: np.ndarray, n_relevant: np.ndarray, k: int | None = None) -> np.ndarray:
    """AP per query: mean over the relevant items of the precision at their rank (trec_eval `map`).

    With `k`, only relevant items ranked <= k count and the denominator stays the number of relevant items
    (trec_eval `map_cut_k`). Queries without relevant items score 0, as in trec_eval.
    """
    r = _as_ranks(ranks)
    n_rel = np.asarray(n_relevant, dtype=np.float64)
    limit = np.inf if k is None else float(k)
    hit = np.isfinite(r) & (r <= limit)
    # After sorting, the i-th (1-based) ranked relevant item has precision i / rank at its own rank.
    position = np.cumsum(hit, axis=1)
    precision = np.where(hit, position / np.where(hit, r, 1.0), 0.0)
    return np.divide(precision.sum(axis=1), n_rel, out=np.zeros(len(r)), where=n_rel > 0)


def reciprocal_rank(ranks: np.ndarray, k: int | None = None) -> np.ndarray:
    """1 / rank of the best-ranked relevant item (0 when none is ranked, or none within k): trec_eval
    `recip_rank`, and MRR@k with `k`."""
    best = _as_ranks(ranks)[:, 0]
    limit = np.inf if k is None else float(k)
    ok = np.isfinite(best) & (best <= limit)
    return np.divide(1.0, best, out=np.zeros(len(best)), where=ok)


def recall_at_k(ranks: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Fraction of a query's relevant items ranked within the top k (trec_eval `recall_k`)."""
    r = _as_ranks(ranks)
    n_rel = np.asarray(n_relevant, dtype=np.float64)
    found = (np.isfinite(r) & (r <= k)).sum(axis=1).astype(np.float64)
    return np.divide(found, n_rel, out=np.zeros(len(r)), where=n_rel > 0)


def hit_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """1 where any relevant item is ranked within the top k, else 0. With k = 1 this is accuracy@1: the top
    candidate is a gold one (retrieval "exact match")."""
    best = _as_ranks(ranks)[:, 0]
    return (np.isfinite(best) & (best <= k)).astype(np.float64)


def rank_distance(ranks: np.ndarray) -> np.ndarray:
    """Language bias of one query in a multilingual pool: rank of its lowest-ranked relevant candidate minus
    the rank of its highest-ranked one (0 for a single relevant item; lower is less biased).

    Needs every relevant item ranked (full ranking): padding is inf, so rows are read up to their last finite
    entry and a row with no finite rank is an error.
    """
    r = _as_ranks(ranks)
    finite = np.isfinite(r)
    if not finite[:, 0].all():
        raise ValueError("rank_distance needs at least one ranked relevant item per query")
    worst = np.where(finite, r, -np.inf).max(axis=1)
    return worst - r[:, 0]


def dcg(gains: np.ndarray) -> np.ndarray:
    """Discounted cumulative gain of gains in rank order ([Q, K]): sum of gain / log2(rank + 1)."""
    gains = np.asarray(gains, dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, gains.shape[-1] + 2, dtype=np.float64))
    return (gains * discounts).sum(axis=-1)


def trec_sorted(doc_scores: Mapping[str, float]) -> list[str]:
    """Docids in trec_eval's order: score descending, ties by docid in descending string order."""
    # Two stable sorts: secondary key (docid desc) first, then the primary key (score desc).
    ids = sorted(doc_scores, reverse=True)
    return sorted(ids, key=lambda d: -float(doc_scores[d]))


def trec_metrics(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
                 ndcg_k: Iterable[int] = (10,), recall_k: Iterable[int] = (100,),
                 rr_k: Iterable[int] = (), map_k: Iterable[int] = ()) -> dict[str, dict[str, float]]:
    """Per-query metrics of a run, named like pytrec_eval's output (`map`, `recip_rank`, `ndcg_cut_10`,
    `recall_100`; `recip_rank_100` for MRR@100 and `map_cut_k`, which follow the same conventions).

    Only queries in both `run` and `qrels` are scored, like trec_eval.
    """
    out: dict[str, dict[str, float]] = {}
    for qid in run:
        if qid not in qrels:
            continue
        grades = qrels[qid]
        ranked = trec_sorted(run[qid])
        n_rel = sum(1 for g in grades.values() if g >= 1)
        rel_ranks = [i + 1 for i, d in enumerate(ranked) if grades.get(d, 0) >= 1]
        ranks = pad_ranks([rel_ranks])
        n = np.array([n_rel])
        m: dict[str, float] = {
            "map": float(average_precision(ranks, n)[0]),
            "recip_rank": float(reciprocal_rank(ranks)[0]),
        }
        for k in map_k:
            m[f"map_cut_{k}"] = float(average_precision(ranks, n, k=k)[0])
        for k in rr_k:
            m[f"recip_rank_{k}"] = float(reciprocal_rank(ranks, k=k)[0])
        for k in recall_k:
            m[f"recall_{k}"] = float(recall_at_k(ranks, n, k)[0])
        for k in ndcg_k:
            gains = np.array([[max(grades.get(d, 0), 0) for d in ranked[:k]] + [0] * max(0, k - len(ranked))])
            ideal = np.array([sorted((max(g, 0) for g in grades.values()), reverse=True)[:k]
                              + [0] * max(0, k - len(grades))])
            idcg = float(dcg(ideal)[0])
            m[f"ndcg_cut_{k}"] = float(dcg(gains)[0]) / idcg if idcg > 0 else 0.0
        out[qid] = m
    return out


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over queries (trec_eval's `all` line)."""
    if not per_query:
        return {}
    names = next(iter(per_query.values())).keys()
    return {name: float(np.mean([m[name] for m in per_query.values()])) for name in names}
