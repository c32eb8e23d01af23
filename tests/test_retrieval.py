"""Retrieval: exact top-k and exact full-ranking ranks against a full stable sort (ties included), ScaNN with its
recall against exact search, and the pool-size switch between them."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from mlret.config import default_config, validate
from mlret.eval.retrieval import (
    ExactIndex,
    PerLanguageIndex,
    RecallError,
    RetrievalOptions,
    ScannIndex,
    TopK,
    build_index,
    describe_search,
    exact_topk_scores,
    merge_topk,
    recall_by_language,
    relevant_ranks,
    scann_shape,
    search_summary,
    search_topk,
)


def _tied_data(seed: int, n: int = 3000, q: int = 120, d: int = 8):
    rng = np.random.default_rng(seed)
    # Coarse values: many exact score ties, the case where tie-breaking decides the order.
    cands = np.round(rng.normal(size=(n, d)), 0).astype(np.float32)
    queries = np.round(rng.normal(size=(q, d)), 0).astype(np.float32)
    return queries, cands


def _full_order(queries: np.ndarray, cands: np.ndarray, key: np.ndarray | None = None) -> np.ndarray:
    s = queries @ cands.T
    key = np.arange(len(cands)) if key is None else key
    return np.lexsort((np.broadcast_to(key, s.shape), -s.astype(np.float64)), axis=-1)


@pytest.mark.parametrize("chunk_elements", [997, 2**25])
def test_exact_topk_is_the_stable_sort(chunk_elements):
    queries, cands = _tied_data(0)
    order = _full_order(queries, cands)
    s = queries @ cands.T
    assert ((s[np.arange(len(s)), order[:, 49]][:, None] == s).sum(axis=1) > 1).mean() > 0.5  # ties at the cut
    top = ExactIndex(cands, chunk_elements=chunk_elements).search(queries, 50)
    np.testing.assert_array_equal(top.indices, order[:, :50])
    np.testing.assert_array_equal(top.scores, np.take_along_axis(s, order[:, :50], axis=1))
    assert top.info["method"] == "exact"


def test_exact_topk_k_at_least_pool():
    queries, cands = _tied_data(1, n=7)
    idx, _ = exact_topk_scores(queries @ cands.T, 20)
    np.testing.assert_array_equal(idx, _full_order(queries, cands))


@pytest.mark.parametrize("use_key", [False, True])
def test_relevant_ranks_are_full_ranking_positions(use_key):
    queries, cands = _tied_data(2)
    rng = np.random.default_rng(3)
    key = rng.permutation(len(cands)) if use_key else None
    relevant = [rng.choice(len(cands), size=rng.integers(0, 6), replace=False) for _ in range(len(queries))]
    ranks = relevant_ranks(queries, cands, relevant, tie_key=key, chunk_elements=5000)
    position = np.argsort(_full_order(queries, cands, key), axis=1) + 1  # 1-based rank of every candidate
    for i, rel in enumerate(relevant):
        want = np.sort(position[i, rel]).astype(np.float64)
        got = ranks[i][np.isfinite(ranks[i])]
        np.testing.assert_array_equal(got, want)
        assert np.isinf(ranks[i][len(rel):]).all()


def test_relevant_ranks_errors():
    queries, cands = _tied_data(4, n=10, q=2)
    with pytest.raises(IndexError, match="outside the pool"):
        relevant_ranks(queries, cands, [[0], [10]])
    with pytest.raises(IndexError, match="outside the pool"):
        relevant_ranks(queries, cands, [[-1], [1]])
    bad = cands.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        relevant_ranks(queries, bad, [[0], [1]])


@pytest.fixture(scope="module")
def clustered():
    """20k unit vectors around 200 centres (real embeddings are clustered; uniform random ones are ScaNN's worst
    case) and 300 queries near those centres."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, 32))
    cands = centres[rng.integers(0, 200, 20000)] + 0.35 * rng.normal(size=(20000, 32))
    queries = centres[rng.integers(0, 200, 300)] + 0.35 * rng.normal(size=(300, 32))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return norm(queries), norm(cands)


def test_scann_is_close_to_exact_and_logs_its_recall(clustered, caplog):
    queries, cands = clustered
    opts = RetrievalOptions(method="auto", scann_threshold=10_000, recall_sample=200, leaves_to_search=40)
    with caplog.at_level(logging.INFO, logger="mlret.eval.retrieval"):
        top = search_topk(queries, cands, 10, opts, name="clustered")
    assert top.info["method"] == "scann" and top.info["recall_sample"] == 200
    assert any("ScaNN recall@10 against exact search on 200 queries" in r.getMessage() for r in caplog.records)
    exact = ExactIndex(cands).search(queries, 10)
    recall = np.mean([len(np.intersect1d(a, e)) / 10 for a, e in zip(top.indices, exact.indices)])
    assert recall > 0.9, recall
    assert abs(top.info["recall_vs_exact"] - recall) < 0.05  # the sample estimates the whole
    # Reordering is exact: returned scores are the true dot products, best first.
    true = np.einsum("qd,qkd->qk", queries, cands[top.indices])
    np.testing.assert_allclose(top.scores, true, atol=1e-5)
    assert (np.diff(top.scores, axis=1) <= 0).all()


def test_pool_size_picks_the_method(clustered):
    queries, cands = clustered
    assert isinstance(build_index(cands, 10, RetrievalOptions(scann_threshold=len(cands))), ExactIndex)
    assert isinstance(build_index(cands, 10, RetrievalOptions(scann_threshold=len(cands) - 1)), ScannIndex)
    assert isinstance(build_index(cands[:50], 10, RetrievalOptions(method="exact", scann_threshold=1)), ExactIndex)
    c = default_config()
    c.eval.retrieval.method = "faiss"
    with pytest.raises(ValueError, match="retrieval.method"):
        validate(c)


def multilingual_pool(seed: int = 0, langs: int = 4, per_lang: int = 5000, topics: int = 100, dim: int = 32,
                      offset: float = 0.8, queries: int = 200):
    """Topics shared by every language, each language shifted by its own offset (the language clustering of real
    multilingual embeddings): candidates [langs * per_lang, dim] ordered by language, their language codes, and
    queries near the topics (in no language: every language holds relevant candidates)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim))
    shift = offset * rng.normal(size=(langs, dim))
    lang = np.repeat(np.arange(langs), per_lang)
    cands = centres[rng.integers(0, topics, len(lang))] + shift[lang] + 0.4 * rng.normal(size=(len(lang), dim))
    q = centres[rng.integers(0, topics, queries)] + 0.4 * rng.normal(size=(queries, dim))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return norm(q), norm(cands), np.array([f"l{i}" for i in lang])


def test_merge_topk_is_the_top_of_the_union():
    queries, cands = _tied_data(5, n=600, q=40)
    # Interleaved parts, each in ascending global order (as languages and shards are): ties within a part then
    # follow the global index too.
    parts = [np.sort(p) for p in np.array_split(np.random.default_rng(0).permutation(len(cands)), 3)]
    tops = [ExactIndex(cands[p]).search(queries, 25) for p in parts]
    idx, val = merge_topk([p[t.indices] for p, t in zip(parts, tops)], [t.scores for t in tops], 25)
    full = ExactIndex(cands).search(queries, 25)
    np.testing.assert_array_equal(idx, full.indices)  # ties included: index order decides across parts too
    np.testing.assert_array_equal(val, full.scores)


def test_per_language_index_with_exact_parts_is_exact():
    queries, cands = _tied_data(6, n=900, q=30)
    langs = np.array(["de", "en", "zh"])[np.random.default_rng(1).integers(0, 3, len(cands))]  # interleaved
    index = build_index(cands, 40, RetrievalOptions(method="exact", per_language_index=True), langs)
    assert isinstance(index, PerLanguageIndex)
    assert [x for x, _, _ in index.parts] == list(dict.fromkeys(langs.tolist()))  # first-appearance order
    top = index.search(queries, 40)
    full = ExactIndex(cands).search(queries, 40)
    np.testing.assert_array_equal(top.indices, full.indices)
    np.testing.assert_array_equal(top.scores, full.scores)


def test_per_language_scann_keeps_every_language(caplog):
    """One ScaNN tree per language, each searched on a quarter of its leaves, merged: every language keeps its
    share of the exact top k (the XQuAD-R comparison with a single tree is in benchmarks/retrieval_scale.py)."""
    queries, cands, langs = multilingual_pool()
    k = 50
    exact = ExactIndex(cands).search(queries, k).indices
    per = RetrievalOptions(method="scann", per_language_index=True, leaves_to_search=18, recall_sample=100)
    with caplog.at_level(logging.INFO, logger="mlret.eval.retrieval"):
        top = search_topk(queries, cands, k, per, name="multi", languages=langs)  # 71 leaves per language
    assert top.info["method"] == "per_language" and set(top.info["languages"]) == set(langs)
    assert all(part["method"] == "scann" and part["num_leaves"] == 71 for part in top.info["languages"].values())
    by_per = recall_by_language(top.indices, exact, langs)
    assert min(by_per.values()) >= 0.95, by_per
    assert top.info["recall_by_language"].keys() == by_per.keys()
    assert any("per-language index recall@50" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(top.scores, np.einsum("qd,qkd->qk", queries, cands[top.indices]), atol=1e-5)


def test_quantised_reordering_rescores_the_final_k(clustered):
    queries, cands = clustered
    index = ScannIndex(cands, 10, RetrievalOptions(reorder_dtype="int8", leaves_to_search=40))
    top = index.search(queries, 10)
    np.testing.assert_allclose(top.scores, np.einsum("qd,qkd->qk", queries, cands[top.indices]), rtol=0, atol=1e-6)
    assert (np.diff(top.scores, axis=1) <= 0).all() and top.info["reorder_dtype"] == "int8"
    c = default_config()
    c.eval.retrieval.reorder_dtype = "float8"
    with pytest.raises(ValueError, match="reorder_dtype"):
        validate(c)


@pytest.mark.parametrize("reorder_dtype", ["float32", "bfloat16", "int8"])
def test_scann_never_returns_its_padding(clustered, reorder_dtype):
    """A tiny pool over many leaves, one searched: ScaNN reaches fewer than k candidates and pads (index 0, NaN).
    The index searches those queries again on more leaves: every list holds k distinct candidates, each list is
    exact search on its own candidates (float32 scores, sorted by score then index), whatever the reorder dtype."""
    queries, cands = clustered[0][:60], clustered[1][:400]
    index = ScannIndex(cands, 100, RetrievalOptions(num_leaves=40, leaves_to_search=1, reorder_dtype=reorder_dtype))
    top = index.search(queries, 100)
    assert top.info["retried_queries"] > 0 and top.info["short_queries"] == 0  # it padded, and nothing was kept
    assert (top.found == 100).all() and all(len(set(row)) == 100 for row in top.indices.tolist())
    for q, row, scores in zip(queries, top.indices, top.scores):
        exact = ExactIndex(cands[row]).search(q[None], 100)
        np.testing.assert_allclose(scores, exact.scores[0], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.sort(row), np.sort(row[exact.indices[0]]))


def test_padding_sorts_last_and_short_lists_never_cut_others():
    """Merged lists of different lengths keep every query's results: a short list pads only itself."""
    idx_a = np.array([[4, 2, -1], [7, 1, 0]])
    val_a = np.array([[0.9, 0.5, -np.inf], [0.8, 0.7, 0.1]], dtype=np.float32)
    idx_b = np.array([[-1, -1, -1], [9, -1, -1]])
    val_b = np.array([[-np.inf] * 3, [0.75, -np.inf, -np.inf]], dtype=np.float32)
    idx, val = merge_topk([idx_a, idx_b], [val_a, val_b], 3)
    np.testing.assert_array_equal(idx, [[4, 2, -1], [7, 9, 1]])
    assert np.isneginf(val[0, 2]) and np.isfinite(val[1]).all()
    top = TopK(idx, val, {})
    np.testing.assert_array_equal(top.found, [2, 3])


def test_default_shape_reaches_the_reordered_candidates():
    for n in (50, 800, 3_000, 20_000, 1_000_000, 30_000_000):
        for k in (10, 100):
            leaves, searched, reorder = scann_shape(n, k, RetrievalOptions())
            assert 1 <= searched <= leaves <= n and reorder == max(200, 10 * k)
            assert searched == leaves or searched * n / leaves >= 4 * reorder, (n, k, leaves, searched)
            assert searched >= leaves / 10
    assert scann_shape(10_000, 10, RetrievalOptions(num_leaves=7, leaves_to_search=3)) == (7, 3, 200)


def test_spherical_trees_for_unit_vectors(clustered):
    queries, cands = clustered
    assert ScannIndex(cands[:2000], 10, RetrievalOptions()).params["spherical"] is True
    assert ScannIndex(cands[:2000] * 3, 10, RetrievalOptions()).params["spherical"] is False
    assert ScannIndex(cands[:2000] * 3, 10, RetrievalOptions(spherical="true")).params["spherical"] is True
    c = default_config()
    c.eval.retrieval.spherical = "yes"
    with pytest.raises(ValueError, match="eval.retrieval.spherical"):
        validate(c)


def test_per_language_index_without_languages_is_an_error(clustered):
    with pytest.raises(ValueError, match="per_language_index is set but this search was given no"):
        build_index(clustered[1][:500], 10, RetrievalOptions(method="scann", per_language_index=True))


def test_recall_below_the_floor_searches_exactly_or_fails(caplog):
    """A single tree over a multilingual pool, a few leaves searched: recall below the floor. By default the
    search is done again exactly (the lists are exact search's, and say where they came from); `fail` stops."""
    queries, cands, langs = multilingual_pool(per_lang=1500)
    low = RetrievalOptions(method="scann", num_leaves=60, leaves_to_search=2, recall_sample=100, recall_floor=0.99)
    with caplog.at_level(logging.WARNING, logger="mlret.eval.retrieval"):
        top = search_topk(queries, cands, 50, low, name="pool", languages=langs)
    exact = ExactIndex(cands).search(queries, 50)
    assert top.info["method"] == "exact" and top.info["fallback"]["recall_vs_exact"] < 0.99
    np.testing.assert_array_equal(top.indices, exact.indices)
    assert any("searching again exactly" in r.getMessage() for r in caplog.records)
    assert search_summary([top.info]) == {"search_recall_min": pytest.approx(
        min([top.info["fallback"]["recall_vs_exact"], *top.info["fallback"]["recall_by_language"].values()])),
        "search_exact_fallbacks": 1, "search_short_queries": 0}
    assert describe_search([top.info]).startswith("exact (fell back from ScaNN")
    with pytest.raises(RecallError, match="on_low_recall=fail"):
        search_topk(queries, cands, 50, dataclasses.replace(low, on_low_recall="fail"), languages=langs)
