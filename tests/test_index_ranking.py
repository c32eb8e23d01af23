"""LAReQA and TyDi QA ranked through the index (config.eval.retrieval.rank_with_index): with a list as long as
the pool it is the full ranking, metric for metric; shorter or approximate, it reports its recall against exact
search; built from config, every retrieval evaluator gets the options."""

from __future__ import annotations

import numpy as np
import pytest

from mlret.eval import build_evaluators
from mlret.eval.base import NgramEmbedder
from mlret.eval.lareqa import LareqaEvaluator
from mlret.eval.retrieval import RetrievalOptions
from mlret.eval.tydiqa import TydiQAEvaluator


@pytest.fixture(scope="module")
def xquad(shared_data):
    return str(shared_data / "xquad-r")


def test_lareqa_through_an_exact_index_of_the_whole_pool_is_the_full_ranking(xquad):
    emb = NgramEmbedder(dim=256)
    langs = ["en", "de", "zh"]
    full = LareqaEvaluator("xquad_r", xquad, langs, max_paragraphs=6, plots=False).run(emb)
    pool = full.details["candidates_total"]
    opts = RetrievalOptions(method="exact", rank_with_index=True, rank_k=pool)
    via = LareqaEvaluator("xquad_r", xquad, langs, max_paragraphs=6, plots=False, retrieval=opts).run(emb)
    assert via.summary == pytest.approx(full.summary)
    assert len(via.details["search"]) == 3 * (1 + 3)  # per query language: the multilingual pool and each language


def test_lareqa_through_per_language_scann_reports_recall(xquad):
    emb = NgramEmbedder(dim=256)
    langs = ["en", "de", "zh"]
    opts = RetrievalOptions(method="scann", per_language_index=True, rank_with_index=True, rank_k=20,
                            num_leaves=8, leaves_to_search=4, recall_sample=500, recall_floor=0.0)
    full = LareqaEvaluator("xquad_r", xquad, langs, max_paragraphs=12, plots=False, settings=("multi",)).run(emb)
    via = LareqaEvaluator("xquad_r", xquad, langs, max_paragraphs=12, plots=False, settings=("multi",),
                          retrieval=opts).run(emb)
    info = via.details["search"][0]
    assert info["method"] == "per_language" and set(info["languages"]) == set(langs)
    assert set(info["recall_by_language"]) == set(langs)
    assert 0 < via.summary["search_recall_min"] <= 1
    # A truncated ranking can only lose relevant sentences: no query's reciprocal rank improves on average.
    assert via.summary["multi_mrr"] <= full.summary["multi_mrr"] + 1e-9


def test_tydiqa_language_pool_through_the_index(shared_data):
    path = str(shared_data / "tydiqa-primary-sample" / "tiny_dev.jsonl.gz")
    emb = NgramEmbedder(dim=256)
    full = TydiQAEvaluator("tydiqa", path, mrr_k=10, candidates="language").run(emb)
    opts = RetrievalOptions(method="exact", rank_with_index=True, rank_k=10)
    via = TydiQAEvaluator("tydiqa", path, mrr_k=10, candidates="language", retrieval=opts).run(emb)
    assert via.summary == pytest.approx(full.summary)  # MRR@10 and acc@1 need only the top 10
    assert len(via.details["search"]) == len(full.details["languages"])


def test_build_evaluators_passes_the_retrieval_options(shared_data):
    from mlret.config import default_config

    c = default_config()
    c.data.data_dir = str(shared_data)
    c.eval.evaluators = "xquad_r,tydiqa"
    c.eval.tydiqa.path = str(shared_data / "tydiqa-primary-sample" / "tiny_dev.jsonl.gz")
    c.eval.retrieval.rank_with_index = True
    c.eval.retrieval.per_language_index = True
    for ev in build_evaluators(c):
        assert ev.retrieval.rank_with_index and ev.retrieval.per_language_index
    np.testing.assert_equal(c.eval.retrieval.rank_k, 100)
