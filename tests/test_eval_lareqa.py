"""The LAReQA protocol on the real XQuAD-R and MLQA-R files: counts against the published tables, the half-open
answer rule, the three settings, metrics against pytrec_eval, the summary keys, and the matrices / heatmaps."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from mlret.config import default_config, validate
from mlret.data import readers
from mlret.data.datasets import MLQA_R, XQUAD_R
from mlret.errors import DataError
from mlret.eval.base import NgramEmbedder
from mlret.eval.lareqa import (
    LareqaEvaluator,
    evaluate_embeddings,
    load,
    load_language,
)


def published_table(readme: Path, column: int) -> dict[str, tuple[int, int]]:
    """{lang: (questions, candidates)} from the statistics table of the LAReQA README shipped with the data
    (column 0: the first questions/candidates pair of columns, 1: the second)."""
    out = {}
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 + 2 * column and re.fullmatch(r"[a-z]{2}", cells[0]):
            q, c = cells[1 + 2 * column], cells[2 + 2 * column]
            if q.isdigit() and c.isdigit():
                out[cells[0]] = (int(q), int(c))
    return out


@pytest.fixture(scope="module")
def xquad(shared_data):
    return load(str(shared_data / "xquad-r"), XQUAD_R.languages)


@pytest.fixture(scope="module")
def mlqa(shared_data):
    return load(str(shared_data / "mlqa-r"), MLQA_R.languages)


@pytest.mark.parametrize("name,readme,column", [
    ("xquad", "xquad-r/README-source.md", 0),
    ("mlqa", "mlqa-r/README-source.md", 1),
])
def test_counts_equal_the_published_table(name, readme, column, request, shared_data):
    langs = request.getfixturevalue(name)
    table = published_table(shared_data / readme, column)
    assert sorted(table) == sorted(langs), "the README table and our language list disagree"
    for lang, (n_questions, n_candidates) in table.items():
        assert len(langs[lang].question_ids) == n_questions, lang
        assert len(langs[lang].sentences) == n_candidates, lang
        assert len(set(langs[lang].keys)) == n_candidates  # keyed by position: no two candidates share a key
    # The multilingual pool is the union of every language's candidates (13,014 / 20,534 in the papers).
    assert sum(len(x.sentences) for x in langs.values()) == sum(c for _, c in table.values())
    # XQuAD-R is 11-way parallel (every id in every language); MLQA-R questions exist in 2 to 4 languages.
    ways = {}
    for x in langs.values():
        for q in x.question_ids:
            ways[q] = ways.get(q, 0) + 1
    if name == "xquad":
        assert set(ways.values()) == {len(langs)}
    else:
        assert min(ways.values()) >= 2 and max(ways.values()) <= 4


def test_half_open_answer_rule(xquad, mlqa):
    """Gold = the sentence whose [start, end) holds answer_start; a closed interval disagrees exactly where a
    sentence ends where the next begins and the answer opens the next one (mostly zh)."""
    for langs in (xquad, mlqa):
        differs = 0
        for x in langs.values():
            data = json.load(open(x.path, encoding="utf-8"))
            answers = [(par["sentence_breaks"], qa["answers"][0]["answer_start"])
                       for art in data["data"] for par in art["paragraphs"] for qa in par["qas"]]
            for (breaks, start), gold in zip(answers, x.gold):
                a, p, j = x.keys[gold]
                assert breaks[j][0] <= start < breaks[j][1]
                closed = next(i for i, (b, e) in enumerate(breaks) if b <= start <= e)
                if closed != j:
                    differs += 1
                    assert closed == j - 1 and breaks[j - 1][1] == breaks[j][0] == start
        assert differs > 0  # the rule matters on these files


def test_evaluator_gold_is_the_training_positive(xquad, shared_data):
    """One parser for both sides: every question's gold candidate in the evaluator is the positive of its training
    unit in that language, and candidates are keyed by position, unique even where sentence texts repeat."""
    langs = ["de", "zh"]
    units = {u.id: u for u in readers.read_squad_sentences(
        {lang: shared_data / "xquad-r" / f"{lang}.json" for lang in langs}, source="xquad_r")}
    for lang in langs:
        x = xquad[lang]
        raw = json.loads((shared_data / "xquad-r" / f"{lang}.json").read_text(encoding="utf-8"))
        assert len(set(x.keys)) == len(x.keys) == sum(len(p["sentences"]) for a in raw["data"]
                                                      for p in a["paragraphs"])
        for qid, gold in zip(x.question_ids, x.gold):
            assert x.sentences[gold] == units[qid].texts[lang].positive


def test_bad_files_name_the_record(tmp_path):
    bad = {"data": [{"title": "T", "paragraphs": [{"context": "ab. cd.", "sentences": ["ab.", "cd."],
                                                    "sentence_breaks": [[0, 3], [4, 7]],
                                                    "qas": [{"id": "q1", "question": "?",
                                                             "answers": [{"answer_start": 3, "text": " "}]}]}]}]}
    path = tmp_path / "xx.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"xx.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: qa 'q1'"):
        load_language(str(path), "xx")
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_language(str(tmp_path / "missing.json"), "xx")


@pytest.fixture(scope="module")
def mlqa_result(mlqa):
    """Every MLQA-R candidate (the full 20,534 pool) but only the questions of a few shared ids per language
    pair, so that pytrec_eval, fed Python dicts, can check the same rankings quickly."""
    ids = {x: v.question_ids for x, v in mlqa.items()}
    keep = {q for x in ids for y in ids if x < y for q in sorted(set(ids[x]) & set(ids[y]))[:3]}

    def subset(v):
        rows = [i for i, q in enumerate(v.question_ids) if q in keep]
        return dataclasses.replace(v, question_ids=[v.question_ids[i] for i in rows],
                                   questions=[v.questions[i] for i in rows], gold=v.gold[rows])

    langs = {x: subset(v) for x, v in mlqa.items()}
    emb = NgramEmbedder(dim=256)
    q = {x: emb.queries(v.questions) for x, v in langs.items()}
    c = {x: emb.passages(v.sentences) for x, v in langs.items()}
    return evaluate_embeddings(langs, q, c, map_k=20), q, c, langs


def test_settings_cover_the_protocol(mlqa_result):
    result, _, _, mlqa = mlqa_result
    assert len(result.details["mono"]) == 7
    assert sum(len(row) for row in result.details["cross"].values()) == 42
    assert result.details["candidates_total"] == sum(len(x.sentences) for x in mlqa.values())
    ids = {x: set(v.question_ids) for x, v in mlqa.items()}
    for x in mlqa:
        for y, m in result.details["cross"][x].items():
            assert m["queries"] == len(ids[x] & ids[y])  # only questions that exist in the target language
        ways = [sum(q in ids[y] for y in mlqa) for q in mlqa[x].question_ids]
        assert result.details["multi"][x]["mean_relevant"] == pytest.approx(np.mean(ways))


def _trec_check(queries, cands, relevant, ours_map, ours_mrr):
    """pytrec_eval on the same scores; docids whose descending string order is the index order, so that its tie
    rule is ours (candidate index)."""
    s = queries @ cands.T
    docid = [f"{10**7 - j:08d}" for j in range(len(cands))]
    run = {str(i): {docid[j]: float(s[i, j]) for j in range(len(cands))} for i in range(len(queries))}
    qrels = {str(i): {docid[j]: 1 for j in rel} for i, rel in enumerate(relevant)}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"map", "recip_rank"}).evaluate(run)
    assert ours_map == pytest.approx(np.mean([r["map"] for r in ref.values()]), abs=1e-6)
    assert ours_mrr == pytest.approx(np.mean([r["recip_rank"] for r in ref.values()]), abs=1e-6)


def test_mono_cross_multi_agree_with_pytrec_eval(mlqa_result):
    result, q, c, mlqa = mlqa_result
    gold = {x: v.gold_by_id() for x, v in mlqa.items()}
    # cross: de -> es
    keep = [i for i, qid in enumerate(mlqa["de"].question_ids) if qid in gold["es"]]
    rel = [[gold["es"][mlqa["de"].question_ids[i]]] for i in keep]
    m = result.details["cross"]["de"]["es"]
    _trec_check(q["de"][keep], c["es"], rel, m["map"], m["mrr"])
    # mono: vi
    m = result.details["mono"]["vi"]
    _trec_check(q["vi"], c["vi"], [[g] for g in mlqa["vi"].gold], m["map"], m["mrr"])
    # multi: zh queries against the 20,534-candidate pool, one relevant per language the question exists in
    order = list(mlqa)
    offset = dict(zip(order, np.cumsum([0] + [len(mlqa[x].sentences) for x in order])))
    rel = [[offset[y] + gold[y][qid] for y in order if qid in gold[y]] for qid in mlqa["zh"].question_ids]
    m = result.details["multi"]["zh"]
    _trec_check(q["zh"], np.concatenate([c[x] for x in order]), rel, m["map"], m["mrr"])


def test_summary_is_the_macro_average(mlqa_result):
    result, *_ = mlqa_result
    s = result.summary
    for key in ("mono_map", "cross_map", "multi_map", "mono_r1", "cross_r1", "multi_r10", "mrr", "rank_distance",
                "multi_map_at_20"):
        assert np.isfinite(s[key]), key
    assert s["mono_map"] == pytest.approx(np.mean([m["map"] for m in result.details["mono"].values()]))
    assert s["cross_r1"] == pytest.approx(np.mean([np.mean([m["r1"] for m in row.values()])
                                                   for row in result.details["cross"].values()]))
    assert s["rank_distance"] == pytest.approx(np.mean([m["rank_distance"] for m in result.details["multi"].values()]))
    assert s["mrr"] == s["multi_mrr"]
    # One relevant candidate in mono / cross: R@1 is accuracy@1, and AP is reciprocal rank.
    assert s["mono_r1"] == pytest.approx(s["mono_acc1"]) and s["cross_map"] == pytest.approx(s["cross_mrr"])
    # mAP@20 can only lose the relevant items ranked below 20.
    assert s["multi_map_at_20"] <= s["multi_map"] + 1e-12


def by_group(pq, metric, *columns):
    """Mean of a per-query metric per group of rows (groups named by the given PerQuery columns)."""
    groups: dict = {}
    for i, v in enumerate(pq.values[metric]):
        groups.setdefault(tuple(getattr(pq, c)[i] for c in columns), []).append(v)
    return {k: float(np.mean(v)) for k, v in groups.items()}


def test_per_query_values_are_what_the_tables_average(mlqa_result):
    """run()'s per-query values: one row per (query language, question) in mono and multi, per (query language,
    target language, question) in cross; their means are the per-language tables and, macro-averaged, the
    summary."""
    result, _, _, mlqa = mlqa_result
    pq = result.per_query
    assert set(pq) == {"mono", "cross", "multi"} and pq["cross"].targets is not None
    n = sum(len(v.question_ids) for v in mlqa.values())
    assert len(pq["mono"].ids) == len(pq["multi"].ids) == n
    assert len(pq["cross"].ids) == sum(m["queries"] for row in result.details["cross"].values() for m in row.values())
    for setting in ("mono", "multi"):
        for metric in ("map", "mrr", "r10", "map_at_20"):
            means = by_group(pq[setting], metric, "languages")
            for (x,), v in means.items():
                assert v == pytest.approx(result.details[setting][x][metric], rel=1e-12), (setting, metric, x)
            assert np.mean(list(means.values())) == pytest.approx(result.summary[f"{setting}_{metric}"])
    cross = by_group(pq["cross"], "map", "languages", "targets")
    for (x, y), v in cross.items():
        assert v == pytest.approx(result.details["cross"][x][y]["map"], rel=1e-12)
    assert by_group(pq["multi"], "rank_distance", "languages")[("zh",)] == pytest.approx(
        result.details["multi"]["zh"]["rank_distance"])


class OracleEmbedder:
    """Each question is a one-hot of its id; each candidate sums the one-hots of the questions it answers, so
    every relevant candidate scores 1 and every other one 0. Keyed by position (the evaluator encodes all
    questions, then all candidates, in language order), since real question and sentence texts repeat."""

    def __init__(self, langs):
        ids = sorted({q for x in langs.values() for q in x.question_ids})
        index = {q: i for i, q in enumerate(ids)}
        self.dim = len(ids)
        self.question_rows = [index[q] for x in langs.values() for q in x.question_ids]
        self.candidate_rows: list[list[int]] = []
        for x in langs.values():
            answers: dict[int, list[int]] = {}
            for qid, g in zip(x.question_ids, x.gold):
                answers.setdefault(int(g), []).append(index[qid])
            self.candidate_rows += [answers.get(j, []) for j in range(len(x.sentences))]

    def queries(self, texts):
        assert len(texts) == len(self.question_rows)
        out = np.zeros((len(texts), self.dim), np.float32)
        out[np.arange(len(texts)), self.question_rows] = 1
        return out

    def passages(self, texts):
        assert len(texts) == len(self.candidate_rows)
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, cols in enumerate(self.candidate_rows):
            out[i, cols] = 1
        return out


def test_perfect_retriever_on_a_fast_subset(shared_data, tmp_path):
    ev = LareqaEvaluator("xquad_r", str(shared_data / "xquad-r"), ["en", "de", "zh"], max_paragraphs=6)
    result = ev.run(OracleEmbedder(ev.langs), str(tmp_path))
    s = result.summary
    assert s["mono_map"] == s["cross_map"] == s["multi_map"] == 1.0
    assert s["mono_r1"] == s["cross_r1"] == s["multi_acc1"] == 1.0
    # The three relevant sentences (one per language) take the top three ranks: the lowest is at rank 3.
    assert s["rank_distance"] == 2.0
    matrices = json.loads((tmp_path / "xquad_r_matrices.json").read_text())
    assert matrices["languages"] == ["en", "de", "zh"]
    assert np.array(matrices["pairs"]["map"]).shape == (3, 3)
    for f in ("xquad_r_pairs_map.png", "xquad_r_pairs_r1.png", "xquad_r_multi.png",
              "xquad_r_multi_rank_distance.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.details["candidates_total"] < 13014 and result.details["options"]["max_paragraphs"] == 6


def test_candidate_context_option(shared_data):
    ev = LareqaEvaluator("xquad_r", str(shared_data / "xquad-r"), ["en"], candidate_context="paragraph",
                         context_separator=" || ", max_paragraphs=2)
    lang = ev.langs["en"]
    texts = ev.candidate_texts(lang)
    assert texts[0] == lang.sentences[0] + " || " + lang.paragraphs[0]
    assert LareqaEvaluator("x", "", ["en"]).candidate_texts(lang) == lang.sentences
    c = default_config()
    c.eval.xquad_r.candidate_context = "article"
    with pytest.raises(ValueError, match="candidate_context"):
        validate(c)
