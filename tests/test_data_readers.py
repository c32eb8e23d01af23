"""Readers: real XQuAD-R / MLQA-R / MIRACL / Mr. TyDi files from ../shared/data, and small files in the exact
public formats (MLQA, SQuAD translate-train, mMARCO, TyDi QA GoldP, user JSONL) written here; bad input."""

import bisect
import collections
import gzip
import json

import pytest

from mlret.data import readers
from mlret.data.units import BadRecords, LangText, ParallelUnit, dumps_unit
from mlret.errors import DataError

MLQA = ("ar", "de", "en", "es", "hi", "vi", "zh")
XQUAD = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")


def _raw_questions(path):
    """(qid, paragraph, qa) of a SQuAD-format file, straight from the JSON."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    return [(qa["id"], para, qa) for art in doc["data"] for para in art["paragraphs"] for qa in para["qas"]]


@pytest.fixture(scope="module")
def mlqa_units(shared_data):
    return readers.read_squad_sentences({lang: shared_data / "mlqa-r" / f"{lang}.json" for lang in MLQA},
                                        source="mlqa_r")


def test_mlqa_r_units_keyed_by_question_id(shared_data, mlqa_units):
    by_id = {u.id: u for u in mlqa_units}
    assert len(by_id) == len(mlqa_units)
    ids_per_lang = {lang: {q for q, _, _ in _raw_questions(shared_data / "mlqa-r" / f"{lang}.json")} for lang in MLQA}
    assert set(by_id) == set().union(*ids_per_lang.values())
    for lang in MLQA:  # every question of every file is in its unit, nothing dropped
        assert {u.id for u in mlqa_units if lang in u.texts} == ids_per_lang[lang]
    assert {len(u.texts) for u in mlqa_units} <= {2, 3, 4}  # MLQA-R: 2-4-way parallel


def test_mlqa_r_positive_is_the_answer_sentence_half_open(shared_data, mlqa_units):
    by_id = {u.id: u for u in mlqa_units}
    abutting = answer_inside = total = 0
    for lang in MLQA:
        for qid, para, qa in _raw_questions(shared_data / "mlqa-r" / f"{lang}.json"):
            start = qa["answers"][0]["answer_start"]
            starts = [b[0] for b in para["sentence_breaks"]]
            k = bisect.bisect_right(starts, start) - 1  # the last sentence starting at or before the answer
            assert start < para["sentence_breaks"][k][1]
            t = by_id[qid].texts[lang]
            assert t.query == qa["question"]
            assert t.positive == para["sentences"][k]
            # Where breaks abut (zh, hi, vi), an answer opening sentence k belongs to k, not to k - 1.
            if k > 0 and para["sentence_breaks"][k - 1][1] == start:
                abutting += 1
            answer_inside += qa["answers"][0]["text"][:10] in t.positive
            total += 1
            # Negatives: other sentences of the same paragraph, the nearest one first.
            others = [s for i, s in enumerate(para["sentences"]) if i != k and s != t.positive]
            assert set(t.negatives) <= set(others) and len(t.negatives) == min(16, len(set(others)))
            if t.negatives:
                near = {para["sentences"][i] for i in (k - 1, k + 1) if 0 <= i < len(para["sentences"])}
                assert t.negatives[0] in near or not (near - {t.positive})
    assert abutting > 0  # the data has such questions (mostly zh); each got the later sentence above
    assert answer_inside >= 0.99 * total


def test_mlqa_r_paragraph_context(shared_data):
    files = {lang: shared_data / "mlqa-r" / f"{lang}.json" for lang in ("de", "en")}
    plain = {u.id: u for u in readers.read_squad_sentences(files, source="mlqa_r")}
    ctx = readers.read_squad_sentences(files, source="mlqa_r", paragraph_context=True, max_negatives=2)
    contexts = {qid: para["context"] for qid, para, _ in _raw_questions(files["de"])}
    for u in ctx:
        if "de" not in u.texts:
            continue
        t, p = u.texts["de"], plain[u.id].texts["de"]
        assert t.positive == readers.sentence_with_context(p.positive, contexts[u.id])
        assert t.negatives == tuple(readers.sentence_with_context(n, contexts[u.id]) for n in p.negatives[:2])


def test_xquad_r_is_11_way(shared_data):
    units = readers.read_squad_sentences({lang: shared_data / "xquad-r" / f"{lang}.json" for lang in XQUAD},
                                         source="xquad_r")
    assert len(units) == len(_raw_questions(shared_data / "xquad-r" / "en.json"))
    assert all(set(u.texts) == set(XQUAD) for u in units)


def _squad(articles):
    """SQuAD v1.1 JSON from [(title, [(context, [(id, question, answer, answer_start)])])]."""
    return json.dumps({"version": "1.1", "data": [
        {"title": title, "paragraphs": [
            {"context": ctx, "qas": [{"id": qid, "question": q, "answers": [{"text": a, "answer_start": s}]}
                                     for qid, q, a, s in qas]} for ctx, qas in paras]}
        for title, paras in articles]})


def _mlqa_files(tmp_path):
    en_ctx = "Paris is the capital of France. It has 2 million people. The Seine flows through it."
    de_ctx = "Paris ist die Hauptstadt Frankreichs. Es hat 2 Millionen Einwohner. Die Seine fließt hindurch."
    en2, de2 = "Berlin is in Germany.", "Berlin liegt in Deutschland."
    en = [("Paris", [(en_ctx, [("q1", "How many people live in Paris?", "2 million", en_ctx.index("2 million")),
                               ("q2", "What is the capital of France?", "Paris", 0)]),
                     (en2, [("q3", "Where is Berlin?", "Germany", en2.index("Germany"))])])]
    de = [("Paris", [(de_ctx, [("q1", "Wie viele Menschen leben in Paris?", "2 Millionen",
                                de_ctx.index("2 Millionen"))]),
                     (de2, [("q3", "Wo liegt Berlin?", "Deutschland", de2.index("Deutschland"))])])]
    files = {}
    for lang, arts in (("en", en), ("de", de)):
        files[lang] = tmp_path / f"dev-context-{lang}-question-{lang}.json"
        files[lang].write_text(_squad(arts), encoding="utf-8")
    return files, en_ctx, de_ctx, en2, de2


def test_squad_translated_context_and_sentence(tmp_path):
    files, en_ctx, de_ctx, en2, de2 = _mlqa_files(tmp_path)
    units = {u.id: u for u in readers.read_squad_translated(files, source="mlqa", passage="context")}
    assert set(units) == {"q1", "q2", "q3"}
    assert set(units["q1"].texts) == {"de", "en"} and set(units["q2"].texts) == {"en"}
    assert units["q1"].texts["de"] == LangText("Wie viele Menschen leben in Paris?", de_ctx, (de2,))
    assert units["q3"].texts["en"].negatives == (en_ctx,)  # the article's other paragraph
    units = {u.id: u for u in readers.read_squad_translated(files, source="mlqa", passage="sentence")}
    assert units["q1"].texts["en"].positive == "It has 2 million people."
    assert units["q1"].texts["en"].negatives == ("Paris is the capital of France.", "The Seine flows through it.")
    assert units["q1"].texts["de"].positive == "Es hat 2 Millionen Einwohner."
    assert units["q2"].texts["en"].positive == "Paris is the capital of France."


def test_squad_translated_id_pattern(tmp_path):
    ctx = "Ein Satz."
    (tmp_path / "de.json").write_text(_squad([("t", [(ctx, [("q1-de", "Frage?", "Satz", 4)])])]), encoding="utf-8")
    (tmp_path / "en.json").write_text(_squad([("t", [("A sentence.", [("q1", "Question?", "sentence", 2)])])]),
                                      encoding="utf-8")
    files = {"de": tmp_path / "de.json", "en": tmp_path / "en.json"}
    assert len(readers.read_squad_translated(files, source="x")) == 2  # ids differ: two units
    units = readers.read_squad_translated(files, source="x", id_pattern=r"^([^-]+)")
    assert len(units) == 1 and set(units[0].texts) == {"de", "en"}


def test_split_sentences_scripts():
    text = "Hello world. Second one! 你好。我们在这里。 Last"
    spans = readers.split_sentences(text)
    assert [text[a:b] for a, b in spans] == ["Hello world.", "Second one!", "你好。", "我们在这里。", "Last"]


def _write_tsv(path, rows):
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")


def _mmarco(tmp_path):
    for lang, word in (("en", "passage"), ("de", "Passage")):
        _write_tsv(tmp_path / f"{lang}_queries.train.tsv", [(q, f"{lang} query {q}") for q in (1, 2, 3)])
        _write_tsv(tmp_path / f"{lang}_collection.tsv", [(p, f"{word} {p}") for p in range(10, 20)])
    _write_tsv(tmp_path / "triples.train.ids.small.tsv",
               [(1, 10, 11), (1, 10, 12), (1, 10, 11), (2, 13, 14), (1, 10, 15), (3, 16, 17), (2, 13, 18)])
    q = {lang: tmp_path / f"{lang}_queries.train.tsv" for lang in ("en", "de")}
    c = {lang: tmp_path / f"{lang}_collection.tsv" for lang in ("en", "de")}
    return q, c, tmp_path / "triples.train.ids.small.tsv"


def test_mmarco(tmp_path):
    q, c, t = _mmarco(tmp_path)
    units = {u.id: u for u in readers.read_mmarco(q, c, t, max_negatives=2)}
    assert set(units) == {"1", "2", "3"}
    assert units["1"].texts["de"] == LangText("de query 1", "Passage 10", ("Passage 11", "Passage 12"))
    assert units["2"].texts["en"] == LangText("en query 2", "passage 13", ("passage 14", "passage 18"))
    assert len(readers.read_mmarco(q, c, t, max_units=2)) == 2
    # A passage missing from one language's collection: an error naming the triple's file and line.
    _write_tsv(tmp_path / "de_collection.tsv", [(p, f"Passage {p}") for p in range(10, 20) if p != 16])
    with pytest.raises(DataError, match=r"triples.train.ids.small.tsv:6: positive passage 16 is not in .*de_coll"):
        readers.read_mmarco(q, c, t)
    bad = BadRecords("skip")
    units = {u.id: u for u in readers.read_mmarco(q, c, t, on_bad=bad)}
    assert set(units["3"].texts) == {"en"} and bad.total == 1


def test_tydiqa_goldp(tmp_path):
    path = tmp_path / "tydiqa-goldp-v1.1-train.json"
    path.write_text(_squad([
        ("Suomi", [("Suomi on valtio Pohjois-Euroopassa.",
                    [("finnish-1438027461885404427-0", "Missä Suomi on?", "Pohjois-Euroopassa", 15)])]),
        ("Kenya", [("Kenya ni nchi katika Afrika Mashariki.",
                    [("swahili-9087651234-1", "Kenya iko wapi?", "Afrika Mashariki", 21)])]),
    ]), encoding="utf-8")
    units = readers.read_tydiqa_goldp(path)
    assert [(u.id, list(u.texts)) for u in units] == [("finnish-1438027461885404427-0", ["fi"]),
                                                      ("swahili-9087651234-1", ["sw"])]
    assert units[0].texts["fi"].positive == "Suomi on valtio Pohjois-Euroopassa."
    assert [u.id for u in readers.read_tydiqa_goldp(path, languages=["sw"])] == ["swahili-9087651234-1"]
    path.write_text(_squad([("x", [("Text here.", [("klingon-1-0", "Q?", "Text", 0)])])]), encoding="utf-8")
    with pytest.raises(DataError, match=r"tydiqa-goldp-v1.1-train.json: data\[0\].paragraphs\[0\].qas\[0\]: .*klingon"):
        readers.read_tydiqa_goldp(path)


def _corpus_for(qrels_path, out, *, id_key="docid", text_key="text", title=True, drop=()):
    """A corpus jsonl.gz in the public format holding every passage the qrels judge."""
    docids = sorted({line.split()[2] for line in qrels_path.read_text(encoding="utf-8").splitlines() if line.strip()})
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for d in docids:
            if d in drop:
                continue
            rec = {id_key: d, text_key: f"text of {d}"}
            if title:
                rec["title"] = f"title {d.split('#')[0]}"
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return docids


def test_miracl_real_topics_and_qrels(shared_data, tmp_path):
    topics = shared_data / "miracl" / "topics.miracl-v1.0-yo-dev.tsv"
    qrels = shared_data / "miracl" / "qrels.miracl-v1.0-yo-dev.tsv"
    _corpus_for(qrels, tmp_path / "docs-0.jsonl.gz")
    units = readers.read_trec_retrieval("yo", topics, qrels, [tmp_path / "docs-0.jsonl.gz"], source="miracl",
                                        max_negatives=50)
    judged = collections.defaultdict(list)
    for line in qrels.read_text(encoding="utf-8").splitlines():
        qid, _, docid, rel = line.split()
        judged[qid].append((docid, int(rel)))
    queries = dict(line.split("\t", 1) for line in topics.read_text(encoding="utf-8").splitlines())
    with_pos = {q for q, js in judged.items() if any(r > 0 for _, r in js)}
    assert {u.id for u in units} == {f"yo:{q}" for q in with_pos}
    for u in units:
        qid = u.id.split(":", 1)[1]
        t = u.texts["yo"]
        first_pos = next(d for d, r in judged[qid] if r > 0)
        assert t.query == queries[qid]
        assert t.positive == f"title {first_pos.split('#')[0]} text of {first_pos}"
        assert t.negatives == tuple(f"title {d.split('#')[0]} text of {d}" for d, r in judged[qid] if r == 0)
    # A judged passage missing from the corpus: error naming the qrels file and line.
    dropped = _corpus_for(qrels, tmp_path / "docs-0.jsonl.gz")[0]
    _corpus_for(qrels, tmp_path / "docs-0.jsonl.gz", drop={dropped})
    with pytest.raises(DataError, match=r"qrels.miracl-v1.0-yo-dev.tsv:\d+: passage .* is not in the corpus"):
        readers.read_trec_retrieval("yo", topics, qrels, [tmp_path / "docs-0.jsonl.gz"], source="miracl")


def test_mrtydi_real_topics_and_qrels(shared_data, tmp_path):
    topics = shared_data / "mrtydi" / "topics.mrtydi-v1.1-sw.test.txt.gz"
    qrels = shared_data / "mrtydi" / "qrels.mrtydi-v1.1-sw.test.txt"
    # Mr. TyDi's collection/docs.jsonl uses {"id", "contents"}.
    _corpus_for(qrels, tmp_path / "docs.jsonl.gz", id_key="id", text_key="contents", title=False)
    units = readers.read_trec_retrieval("sw", topics, qrels, [tmp_path / "docs.jsonl.gz"], source="mrtydi")
    qids = {line.split()[0] for line in qrels.read_text(encoding="utf-8").splitlines()}
    assert {u.id for u in units} == {f"sw:{q}" for q in qids}
    assert all(not u.texts["sw"].negatives for u in units)  # Mr. TyDi judges positives only


def test_units_jsonl_roundtrip_and_bad_lines(tmp_path):
    good = [ParallelUnit("a", "mine", {"de": LangText("Frage", "Antwort", ("Falsch",)), "en": LangText("Q", "A")}),
            ParallelUnit("b", "mine", {"sw": LangText("Swali", "Jibu")})]
    path = tmp_path / "units.jsonl"
    path.write_text("\n".join(dumps_unit(u) for u in good) + "\n\n", encoding="utf-8")
    assert readers.read_units_jsonl(path) == good
    bad_lines = [
        ('{"id": "c", "texts": {"de": {"query": "q", "positive": "p"}', "malformed JSON"),
        ('{"id": "d", "texts": {"xx": {"query": "q", "positive": "p"}}}', "unknown language code 'xx'"),
        ('{"id": "e", "texts": {"de": {"query": " ", "positive": "p"}}}', "empty query"),
        ('{"id": "f", "texts": {"de": {"query": "q", "positive": ""}}}', "empty positive"),
        ('{"id": "g", "texts": {"de": {"query": "q", "positive": "p", "negatives": [""]}}}', "negative 0 is empty"),
        ('{"id": "a", "texts": {"de": {"query": "q", "positive": "p"}}}', "already used at"),
        ('{"id": "h", "texts": {"de": {"query": "q", "positive": "p", "hard": []}}}', "unknown field"),
    ]
    for line, why in bad_lines:
        path.write_text(dumps_unit(good[0]) + "\n" + line + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=rf"units.jsonl:2: .*{why}"):
            readers.read_units_jsonl(path)
    path.write_text("\n".join([dumps_unit(good[0])] + [line for line, _ in bad_lines] + [dumps_unit(good[1])]),
                    encoding="utf-8")
    bad = BadRecords("skip")
    assert readers.read_units_jsonl(path, on_bad=bad) == good
    assert bad.total == len(bad_lines) and bad.counts[str(path)] == len(bad_lines)


def test_malformed_squad_file_names_line_and_column(tmp_path):
    path = tmp_path / "de.json"
    path.write_text('{"data": [\n  {"title": "x",\n   "paragraphs": [}\n]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"de.json:3:\d+: malformed JSON"):
        readers.read_squad_sentences({"de": path}, source="mlqa_r")
    with pytest.raises(DataError, match="unknown language code 'xx'"):
        readers.read_squad_sentences({"xx": path}, source="mlqa_r")


def test_squad_sentences_bad_records_error_or_skip(tmp_path):
    para = {"context": "One. Two.", "sentences": ["One.", "Two."], "sentence_breaks": [[0, 4], [5, 9]],
            "qas": [{"id": "ok", "question": "Which?", "answers": [{"text": "Two", "answer_start": 5}]},
                    {"id": "gap", "question": "Gap?", "answers": [{"text": " ", "answer_start": 4}]},
                    {"id": "empty", "question": "", "answers": [{"text": "One", "answer_start": 0}]}]}
    path = tmp_path / "en.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [para]}]}), encoding="utf-8")
    with pytest.raises(DataError, match=r"en.json: data\[0\].paragraphs\[0\].qas\[1\]: .*lies in no sentence"):
        readers.read_squad_sentences({"en": path}, source="x")
    bad = BadRecords("skip")
    units = readers.read_squad_sentences({"en": path}, source="x", on_bad=bad)
    assert [u.id for u in units] == ["ok"] and units[0].texts["en"].positive == "Two."
    assert bad.total == 2
