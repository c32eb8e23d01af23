"""Our metrics equal pytrec_eval's (trec_eval 9) to 1e-6 on real rankings, ties included.

Rankings: real XQuAD-R questions against real candidate sentences, scored by a lexical (character n-gram)
embedder and rounded to two decimals so that many candidates tie; relevance is the LAReQA gold sentence.
Docids are chosen so that trec_eval's tie order (docid, descending string order) differs from the index order,
which is what a wrong tie rule would get wrong. A second run uses the real MIRACL qrels (graded, with judged
non-relevant documents) for nDCG.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytrec_eval

from mlret.eval import metrics as M
from mlret.eval.base import NgramEmbedder
from mlret.eval.lareqa import load
from mlret.eval.retrieval import relevant_ranks
from mlret.eval.trec import read_qrels

MEASURES = {"map", "recip_rank", "ndcg_cut.10", "recall.100", "map_cut.20", "P.1"}
TOL = 1e-6


@pytest.fixture(scope="module")
def tied_run(shared_data):
    """(run, qrels, scores, gold, docids) for 300 en and 300 de questions against de candidates."""
    langs = load(str(shared_data / "xquad-r"), ["en", "de"])
    emb = NgramEmbedder(dim=256)
    cands = emb.passages(langs["de"].sentences)
    gold_de = langs["de"].gold_by_id()
    qids, texts, gold = [], [], []
    for x in ("en", "de"):
        for qid, text in list(zip(langs[x].question_ids, langs[x].questions))[:300]:
            qids.append(f"{x}:{qid}")
            texts.append(text)
            gold.append(gold_de[qid])
    scores = np.round(emb.queries(texts) @ cands.T, 2).astype(np.float64)
    # Unpadded numbers: string order ("d10" < "d9") is not numeric order, so tie rules show.
    docids = [f"d{i}" for i in range(len(cands))]
    run = {q: {docids[j]: float(scores[i, j]) for j in range(len(docids))} for i, q in enumerate(qids)}
    qrels = {q: {docids[gold[i]]: 1} for i, q in enumerate(qids)}
    return run, qrels, scores, np.array(gold), docids


def _assert_close(ours: dict, ref: dict, names: list[tuple[str, str]]) -> None:
    assert set(ours) == set(ref)
    for q in ref:
        for our_name, ref_name in names:
            assert abs(ours[q][our_name] - ref[q][ref_name]) <= TOL, (q, our_name, ours[q][our_name], ref[q][ref_name])


def test_ties_are_present(tied_run):
    _, _, scores, gold, _ = tied_run
    s_gold = scores[np.arange(len(gold)), gold]
    tied = ((scores == s_gold[:, None]).sum(axis=1) > 1).mean()
    assert tied > 0.3, f"only {tied:.0%} of queries have a tie at the gold score; the test would not see tie rules"


def test_trec_metrics_equal_pytrec_eval(tied_run):
    run, qrels, *_ = tied_run
    ref = pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)
    ours = M.trec_metrics(run, qrels, ndcg_k=(10,), recall_k=(100,), map_k=(20,))
    _assert_close(ours, ref, [("map", "map"), ("recip_rank", "recip_rank"), ("ndcg_cut_10", "ndcg_cut_10"),
                              ("recall_100", "recall_100"), ("map_cut_20", "map_cut_20")])
    means = M.mean_metrics(ours)
    assert abs(means["map"] - np.mean([r["map"] for r in ref.values()])) <= TOL


def test_exact_ranks_with_trec_tie_key_equal_pytrec_eval(tied_run):
    """relevant_ranks (the LAReQA path) with trec_eval's tie order gives trec_eval's AP and RR from embeddings."""
    run, qrels, scores, gold, docids = tied_run
    ref = pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)
    # Rank of each docid in descending string order = the tie key trec_eval uses.
    key = np.empty(len(docids), dtype=np.int64)
    key[np.argsort(np.array(docids), kind="stable")[::-1]] = np.arange(len(docids))
    # Scores as a rank-1 factorisation so relevant_ranks sees exactly these (rounded) scores.
    q = scores.astype(np.float32)
    c = np.eye(scores.shape[1], dtype=np.float32)
    ranks = relevant_ranks(q, c, [[g] for g in gold], tie_key=key)
    n_rel = np.ones(len(gold))
    qids = list(run)
    ap, rr = M.average_precision(ranks, n_rel), M.reciprocal_rank(ranks)
    p1, r100 = M.hit_at_k(ranks, 1), M.recall_at_k(ranks, n_rel, 100)
    for i, qid in enumerate(qids):
        assert abs(ap[i] - ref[qid]["map"]) <= TOL
        assert abs(rr[i] - ref[qid]["recip_rank"]) <= TOL
        assert abs(p1[i] - ref[qid]["P_1"]) <= TOL
        assert abs(r100[i] - ref[qid]["recall_100"]) <= TOL
    # And with the default tie rule (candidate index), the ranks differ somewhere: the rule matters here.
    assert (relevant_ranks(q, c, [[g] for g in gold]) != ranks).any()


def test_graded_miracl_qrels_equal_pytrec_eval(shared_data):
    """Real MIRACL qrels (judged relevant and non-relevant passages) with a tied, truncated run."""
    qrels = read_qrels(str(shared_data / "miracl" / "qrels.miracl-v1.0-sw-dev.tsv"))
    qids = sorted(qrels)[:150]
    qrels = {q: qrels[q] for q in qids}
    pool = sorted({d for q in qids for d in qrels[q]})
    rng = np.random.default_rng(0)
    run = {}
    for q in qids:
        docs = rng.choice(len(pool), size=min(150, len(pool)), replace=False)
        judged = [pool.index(d) for d in qrels[q]]
        docs = np.unique(np.concatenate([docs, rng.choice(judged, size=max(1, len(judged) // 2), replace=False)]))
        run[q] = {pool[j]: float(np.round(rng.random(), 1)) for j in docs}  # coarse scores: many ties
    # One query of the run has no qrels and one query of the qrels is not in the run: trec_eval skips both.
    run["not-judged"] = {pool[0]: 1.0}
    del run[qids[-1]]
    ref = pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)
    ours = M.trec_metrics(run, qrels, ndcg_k=(10,), recall_k=(100,), map_k=(20,))
    _assert_close(ours, ref, [("map", "map"), ("recip_rank", "recip_rank"), ("ndcg_cut_10", "ndcg_cut_10"),
                              ("recall_100", "recall_100"), ("map_cut_20", "map_cut_20")])
    assert any(0 < v["ndcg_cut_10"] < 1 for v in ours.values())


def test_rank_metric_edge_cases():
    ranks = M.pad_ranks([[3, 1], [], [np.inf, 2]])
    n_rel = np.array([2, 0, 2])
    np.testing.assert_allclose(M.average_precision(ranks, n_rel), [(1 / 1 + 2 / 3) / 2, 0.0, (1 / 2) / 2])
    np.testing.assert_allclose(M.reciprocal_rank(ranks), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(M.reciprocal_rank(ranks, k=1), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(M.recall_at_k(ranks, n_rel, 2), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(M.rank_distance(M.pad_ranks([[3, 1, 7], [4]])), [6.0, 0.0])
    with pytest.raises(ValueError, match="1-based"):
        M.average_precision(np.array([[0.0]]), np.array([1]))
    with pytest.raises(ValueError, match="at least one ranked"):
        M.rank_distance(M.pad_ranks([[]]))
