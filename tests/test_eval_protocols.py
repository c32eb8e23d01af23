"""MIRACL / Mr. TyDi (real topics and qrels), TyDi QA (the real primary-task sample) and Tatoeba (real bitext).

The MIRACL and Mr. TyDi corpora are not in ../shared/data, so the corpus here is written from real text: each
judged passage gets the text of a topic (its own topic's text when judged relevant, so that retrieval is
possible but imperfect), plus distractors. The evaluator's summary must equal pytrec_eval's on the run it made.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging

import numpy as np
import pytest
import pytrec_eval

from mlret.config import default_config, validate
from mlret.errors import ConfigError, DataError
from mlret.eval import build_evaluators
from mlret.eval.base import NgramEmbedder
from mlret.eval.retrieval import RecallError, RetrievalOptions
from mlret.eval.tatoeba import TatoebaEvaluator, read_pair
from mlret.eval.trec import TrecEvaluator, read_qrels, read_topics
from mlret.eval.tydiqa import TydiQAEvaluator, read_examples


def write_corpus(path, topics: dict[str, str], qrels: dict[str, dict[str, int]], seed: int,
                 layout: str = "miracl") -> None:
    """A corpus in the layout's published record format: MIRACL {"docid", "title", "text"}, Mr. TyDi's
    docs.jsonl {"id", "contents"}."""
    rng = np.random.default_rng(seed)
    texts = list(topics.values())

    def record(docid: str, title: str, text: str) -> dict:
        if layout == "mrtydi":
            return {"id": docid, "contents": f"{title} {text}".strip()}
        return {"docid": docid, "title": title, "text": text}

    with open(path, "w", encoding="utf-8") as f:
        seen = set()
        for qid, judged in qrels.items():
            for docid, grade in judged.items():
                if docid in seen:
                    continue
                seen.add(docid)
                text = topics[qid] if grade > 0 else texts[rng.integers(len(texts))]
                f.write(json.dumps(record(docid, "", text), ensure_ascii=False) + "\n")
        for i in range(300):
            f.write(json.dumps(record(f"distractor-{i}", "t", texts[rng.integers(len(texts))]),
                               ensure_ascii=False) + "\n")


@pytest.mark.parametrize("layout,lang,split", [("miracl", "yo", "dev"), ("mrtydi", "sw", "test")])
def test_trec_evaluator_equals_pytrec_eval(layout, lang, split, shared_data, tmp_path):
    data_dir = str(shared_data / layout)
    probe = TrecEvaluator(layout, layout, data_dir, "unused", [lang], split=split, max_queries=80)
    topics, qrels = probe.queries(lang)
    assert 0 < len(topics) <= 80 and set(topics) == set(qrels)
    write_corpus(tmp_path / f"corpus-{lang}.jsonl", topics, qrels, seed=0, layout=layout)
    ev = TrecEvaluator(layout, layout, data_dir, str(tmp_path / "corpus-{lang}.jsonl"), [lang], split=split,
                       max_queries=80, retrieval=RetrievalOptions(method="exact"))
    emb = NgramEmbedder(dim=128)
    result = ev.run(emb)
    run, info = ev.retrieve(emb, lang)
    assert info["method"] == "exact" and all(len(r) == 100 for r in run.values())
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "recip_rank"}).evaluate(run)
    got = result.details["languages"][lang]
    assert got["queries"] == len(ref)
    assert got["ndcg10"] == pytest.approx(np.mean([r["ndcg_cut_10"] for r in ref.values()]), abs=1e-6)
    assert got["recall100"] == pytest.approx(np.mean([r["recall_100"] for r in ref.values()]), abs=1e-6)
    # The run holds the top 100, so trec_eval's recip_rank on it is MRR@100.
    assert got["mrr100"] == pytest.approx(np.mean([r["recip_rank"] for r in ref.values()]), abs=1e-6)
    assert 0 < got["ndcg10"] < 1
    assert result.summary["ndcg10"] == got["ndcg10"]
    # Per query: one row per scored topic, the values pytrec_eval gives each.
    pq = result.per_query["queries"]
    assert sorted(pq.ids) == sorted(ref) and set(pq.languages) == {lang}
    for qid, ndcg, mrr in zip(pq.ids, pq.values["ndcg10"], pq.values["mrr100"], strict=True):
        assert ndcg == pytest.approx(ref[qid]["ndcg_cut_10"], abs=1e-6)
        assert mrr == pytest.approx(ref[qid]["recip_rank"], abs=1e-6)


def test_trec_approximate_search_reports_its_recall(shared_data, tmp_path, caplog):
    """Ranked through ScaNN, the evaluator measures recall@100 against exact search (here on every topic, so it
    must equal the overlap with the exact evaluator's run), puts its worst language in the summary (what
    metrics.jsonl and TensorBoard log at each evaluation); below the floor it warns and, by
    config.eval.retrieval.on_low_recall, searches again exactly (the run is then the exact run) or stops."""
    data_dir = str(shared_data / "mrtydi")
    probe = TrecEvaluator("mrtydi", "mrtydi", data_dir, "unused", ["sw"], split="test", max_queries=60)
    topics, qrels = probe.queries("sw")
    write_corpus(tmp_path / "corpus-sw.jsonl", topics, qrels, seed=1, layout="mrtydi")
    corpus = str(tmp_path / "corpus-{lang}.jsonl")
    emb = NgramEmbedder(dim=64)
    exact_run, _ = TrecEvaluator("mrtydi", "mrtydi", data_dir, corpus, ["sw"], split="test", max_queries=60,
                                 retrieval=RetrievalOptions(method="exact")).retrieve(emb, "sw")
    opts = RetrievalOptions(method="scann", num_leaves=20, leaves_to_search=2, recall_sample=1000, recall_floor=0.0)
    ev = TrecEvaluator("mrtydi", "mrtydi", data_dir, corpus, ["sw"], split="test", max_queries=60, retrieval=opts)
    run, info = ev.retrieve(emb, "sw")  # scann takes no seed: the same call's run and recall
    overlap = np.mean([len(set(docs) & set(exact_run[q])) / 100 for q, docs in run.items()])
    assert info["recall_vs_exact"] == pytest.approx(overlap) and overlap < 0.999
    assert info["recall_sample"] == len(topics) and all(len(docs) == 100 for docs in run.values())
    floor = dataclasses.replace(opts, recall_floor=0.999)
    ev = TrecEvaluator("mrtydi", "mrtydi", data_dir, corpus, ["sw"], split="test", max_queries=60, retrieval=floor)
    with caplog.at_level(logging.WARNING, logger="mlret.eval.retrieval"):
        result = ev.run(emb)
    assert 0 < result.summary["search_recall_min"] < 0.999 and result.summary["search_exact_fallbacks"] == 1
    assert result.details["search"]["sw"]["method"] == "exact"
    assert result.details["index"].startswith("exact (fell back from ScaNN")
    assert any("below config.eval.retrieval.recall_floor" in r.getMessage() and "searching again exactly"
               in r.getMessage() for r in caplog.records)
    assert ev.retrieve(emb, "sw")[0] == exact_run  # the fallback's run is the exact run, score for score
    fail = dataclasses.replace(floor, on_low_recall="fail")
    ev = TrecEvaluator("mrtydi", "mrtydi", data_dir, corpus, ["sw"], split="test", max_queries=60, retrieval=fail)
    with pytest.raises(RecallError, match="on_low_recall=fail"):
        ev.run(emb)


def test_trec_readers_name_the_line(tmp_path, shared_data):
    topics = read_topics(str(shared_data / "mrtydi" / "topics.mrtydi-v1.1-sw.dev.txt.gz"))
    assert all(q and t for q, t in topics.items())
    bad = tmp_path / "qrels.txt"
    bad.write_text("1 Q0 d1 1\n2 Q0 d2\n")
    with pytest.raises(DataError, match=r"qrels.txt:2"):
        read_qrels(str(bad))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"docid": "a", "text": "x"}\n{"id": "b", "contents": "y"}\n{"doc": "c", "text": "z"}\n')
    ev = TrecEvaluator("miracl", "miracl", str(shared_data / "miracl"), str(corpus), ["yo"])
    with pytest.raises(DataError, match=r"c.jsonl:3: a corpus record needs 'docid' and 'text'"):
        ev.retrieve(NgramEmbedder(dim=16), "yo")
    c = default_config()
    c.eval.miracl.top_k = 10
    with pytest.raises(ValueError, match="top_k"):
        validate(c)


def test_tydiqa_sample(shared_data):
    path = str(shared_data / "tydiqa-primary-sample" / "tiny_dev.jsonl.gz")
    records = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    with_gold = [r for r in records if any(a["passage_answer"]["candidate_index"] >= 0 for a in r["annotations"])]
    examples, skipped = read_examples(path)
    assert len(examples) == len(with_gold) and skipped["no_gold_passage"] == len(records) - len(with_gold)
    # Candidates are cut from the UTF-8 bytes of the plaintext (byte offsets, not character offsets).
    ex, rec = examples[0], with_gold[0]
    c = rec["passage_answer_candidates"][ex["gold"][0]]
    raw = rec["document_plaintext"].encode("utf-8")[c["plaintext_start_byte"]:c["plaintext_end_byte"]]
    assert ex["passages"][ex["gold"][0]] == raw.decode("utf-8").strip()

    emb = NgramEmbedder(dim=256)
    result = TydiQAEvaluator("tydiqa", path, mrr_k=0).run(emb)
    # Independent check: rank every candidate of the article, ties by index.
    rr, acc = {}, {}
    for ex in examples:
        s = emb.passages(ex["passages"]) @ emb.queries([ex["question"]])[0]
        order = np.lexsort((np.arange(len(s)), -s.astype(np.float64)))
        best = min(int(np.nonzero(order == g)[0][0]) for g in ex["gold"]) + 1
        rr.setdefault(ex["lang"], []).append(1 / best)
        acc.setdefault(ex["lang"], []).append(float(best == 1))
    for lang, m in result.details["languages"].items():
        assert m["mrr"] == pytest.approx(np.mean(rr[lang])) and m["acc1"] == pytest.approx(np.mean(acc[lang]))
    assert result.summary["mrr"] == pytest.approx(np.mean([np.mean(v) for v in rr.values()]))
    pq = result.per_query["questions"]  # per example, in read order
    assert pq.ids == [ex["id"] for ex in examples] and pq.languages == [ex["lang"] for ex in examples]
    for lang in rr:
        rows = [i for i, x in enumerate(pq.languages) if x == lang]
        np.testing.assert_allclose(pq.values["mrr"][rows], rr[lang])
        np.testing.assert_allclose(pq.values["acc1"][rows], acc[lang])
    # The language-wide pool is larger, so no example can rank its gold passage better than in its article.
    pooled = TydiQAEvaluator("tydiqa", path, mrr_k=0, candidates="language").run(emb)
    assert all(pooled.details["languages"][x]["mrr"] <= result.details["languages"][x]["mrr"] + 1e-12
               for x in result.details["languages"])


def test_tydiqa_pool_deduplicates_shared_articles(shared_data, tmp_path):
    """An article shared by several examples (here: each gold record written twice, as TyDi QA does for two
    questions on one article) must not put copies of the gold beside it: the language pool ranks distinct texts,
    so every example scores as it does alone, and the pool holds each distinct passage once."""
    src = shared_data / "tydiqa-primary-sample" / "tiny_dev.jsonl.gz"
    records = [json.loads(line) for line in gzip.open(src, "rt", encoding="utf-8")]
    twice = tmp_path / "shared_articles.jsonl"
    with open(twice, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.write(json.dumps({**r, "example_id": f"{r['example_id']}-copy"}, ensure_ascii=False) + "\n")
    emb = NgramEmbedder(dim=256)
    alone = TydiQAEvaluator("tydiqa", str(src), mrr_k=0, candidates="language").run(emb)
    shared = TydiQAEvaluator("tydiqa", str(twice), mrr_k=0, candidates="language").run(emb)
    examples, _ = read_examples(str(src))
    for lang, m in alone.details["languages"].items():
        distinct = {p for ex in examples if ex["lang"] == lang for p in ex["passages"]}
        assert m["mean_candidates"] == shared.details["languages"][lang]["mean_candidates"] == len(distinct)
        assert shared.details["languages"][lang]["mrr"] == pytest.approx(m["mrr"])
        assert shared.details["languages"][lang]["examples"] == 2 * m["examples"]
    # The real sample repeats a passage within its Russian article: the pool is smaller than the candidate list.
    ru = [ex for ex in examples if ex["lang"] == "ru"]
    assert alone.details["languages"]["ru"]["mean_candidates"] < sum(len(ex["passages"]) for ex in ru)


def test_tatoeba(shared_data):
    data_dir = str(shared_data / "tatoeba" / "v1")
    ev = TatoebaEvaluator("tatoeba", data_dir, ["deu", "spa"], max_sentences=300)
    emb = NgramEmbedder(dim=512)
    result = ev.run(emb)
    for lang in ("deu", "spa"):
        xx, en = read_pair(data_dir, lang, 300)
        a, b = emb.queries(xx), emb.queries(en)
        s = a @ b.T  # the embedder normalises, so this is cosine
        want_xx2en = np.mean(np.argmax(s, axis=1) == np.arange(300))
        want_en2xx = np.mean(np.argmax(s, axis=0) == np.arange(300))  # argmax: first index among ties
        assert result.details["languages"][lang]["xx2en"] == pytest.approx(want_xx2en)
        assert result.details["languages"][lang]["en2xx"] == pytest.approx(want_en2xx)
        assert 0 < want_xx2en < 1
    assert result.summary["xx2en"] == pytest.approx(np.mean([result.details["languages"][x]["xx2en"]
                                                                for x in ("deu", "spa")]))
    pq = result.per_query["pairs"]  # one row per sentence pair: the hit of each direction
    assert pq.languages == ["deu"] * 300 + ["spa"] * 300 and pq.ids[:2] == ["0", "1"]
    for lang in ("deu", "spa"):
        rows = [i for i, x in enumerate(pq.languages) if x == lang]
        for d in ("xx2en", "en2xx"):
            assert set(pq.values[d][rows]) <= {0.0, 1.0}
            assert pq.values[d][rows].mean() == pytest.approx(result.details["languages"][lang][d])
    with pytest.raises(FileNotFoundError, match="three-letter"):
        TatoebaEvaluator("tatoeba", data_dir, ["de"]).run(emb)


def test_build_evaluators_from_config(shared_data, tmp_path):
    c = default_config()
    c.data.data_dir = str(shared_data)
    c.eval.evaluators = "xquad_r,mlqa_r,tatoeba,tydiqa"
    c.eval.tydiqa.path = str(shared_data / "tydiqa-primary-sample" / "tiny_dev.jsonl.gz")
    c.eval.xquad_r.languages = "en,de"
    c.eval.mlqa_r.candidate_context = "paragraph"
    c.checkpoint.best_metric = "xquad_r/multi_map"
    validate(c)
    evs = build_evaluators(c)
    assert [e.name for e in evs] == ["xquad_r", "mlqa_r", "tatoeba", "tydiqa"]
    assert evs[0].languages == ["en", "de"] and evs[0].data_dir == str(shared_data / "xquad-r")
    assert evs[1].candidate_context == "paragraph" and len(evs[1].languages) == 7
    for field, value, match in [("eval.evaluators", "xquad_r,beir", "eval.evaluators"),
                                ("eval.xquad_r.settings", "mono,bilingual", "eval.xquad_r.settings"),
                                ("eval.xquad_r.languages", "en,xx", "eval.xquad_r.languages"),
                                ("eval.retrieval.method", "faiss", "eval.retrieval.method"),
                                ("checkpoint.best_metric", "miracl/ndcg10", "checkpoint.best_metric")]:
        bad = default_config()
        bad.data.data_dir = str(shared_data)
        section, _, key = field.rpartition(".")
        node = bad
        for part in section.split("."):
            node = node[part]
        node[key] = value
        with pytest.raises(ConfigError, match=match):
            validate(bad)
    bad = default_config()
    bad.eval.evaluators = "miracl"
    with pytest.raises(ConfigError, match="eval.miracl.corpus"):
        validate(bad)
