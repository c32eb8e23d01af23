"""Readers: public retrieval / QA formats -> parallel units (`mlret.data.units.ParallelUnit`).

One function per format, each taking explicit file paths (the TFDS builders in `mlret.data.tfds_builders`
know the public file layouts and download URLs):

- `read_lareqa`: the XQuAD-R / MLQA-R parser (SQuAD v1.1 JSON + per-paragraph `sentences` / `sentence_breaks`),
  shared with the LAReQA evaluator; `read_squad_sentences` makes units of it. Query -> the sentence holding the
  answer, found with the half-open rule `start <= answer_start < end` (where breaks abut, as in zh, a closed
  interval would pick the sentence before). Units are keyed by question id
  across the language files. Negatives: the other sentences of the same paragraph in the same language,
  nearest first (natural hard negatives: same topic, same style, not the answer).
- `read_squad_translated`: SQuAD-format sets whose ids link translations (MLQA, XTREME SQuAD translate-train).
  The passage is the context paragraph (negatives: the article's other paragraphs, nearest first) or the
  sentence holding the answer (negatives: the paragraph's other sentences; no breaks ship with these sets, so
  `split_sentences` cuts at sentence-final punctuation).
- `read_mmarco`: mMARCO TSVs (queries, collection per language; id triples shared by all languages or given
  per language). Positives and negatives come from the triples; texts from each language's files.
- `read_tydiqa_goldp`: TyDi QA GoldP (SQuAD format, monolingual; the language is the id prefix).
- `read_trec_retrieval`: MIRACL / Mr. TyDi (TREC topics + qrels + jsonl corpus): judged-relevant passages are
  positives, judged-non-relevant ones are hard negatives (MIRACL judges them; Mr. TyDi has none).
- `read_units_jsonl`: user units, one unit JSON object (`mlret.data.units`) per line.

A record that cannot become a unit goes to `BadRecords` (raise naming file and line, or count-and-log).
A file that is not parseable as a whole (malformed JSON document) always raises, naming line and column.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

from mlret import storage
from mlret.data import datasets
from mlret.data.units import (
    LANG_INDEX,
    BadRecords,
    LangText,
    ParallelUnit,
    as_bad_records,
    check_unit,
    dedupe_keep_order,
    unit_from_json,
)
from mlret.errors import DataError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]



# --------------------------------------------------------------------------------------------------- file
# access

def open_text(path: PathLike) -> IO[str]:
    """Open a text file, local or gs:// (`mlret.storage.path`), gunzipping `*.gz` transparently; the error names
    the path."""
    p = storage.path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.GzipFile(fileobj=p.open("rb")), encoding="utf-8")
    return p.open("r", encoding="utf-8")


def load_json_file(path: PathLike) -> Any:
    """Parse a whole JSON document; a syntax error names file, line and column (the file cannot be used)."""
    with open_text(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None


def _check_lang_keys(files: Mapping[str, Any], what: str) -> None:
    for lang, path in files.items():
        if lang not in LANG_INDEX:
            raise DataError(f"{path}: unknown language code {lang!r} for {what} (mlret.data.LANGUAGES holds "
                            "ISO 639-1 codes such as 'de', 'zh')")


def sentence_with_context(sentence: str, context: str) -> str:
    """The candidate text "sentence, then its paragraph" (LAReQA's answer + context), used by training units
    and, for the same inputs, by evaluation."""
    return f"{sentence}\n{context}"


# Sentence-final punctuation of the scripts in the translated QA sets (Latin, CJK, Devanagari, Arabic, Thai
# has none). CJK full stops end a sentence without a following space.
_SENT_END = re.compile(r"(?<=[.!?;…।؟])\s+|(?<=[。！？；])\s*")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Half-open character spans [start, end) of the sentences of `text` (heuristic: cut after sentence-final
    punctuation). Used only where a set ships no sentence breaks."""
    spans, start = [], 0
    for m in _SENT_END.finditer(text):
        end = m.start()
        if end > start:
            spans.append((start, end))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans or [(0, len(text))]


def _nearest_first(items: Sequence[str], k: int, limit: int, exclude: str) -> tuple[str, ...]:
    """items other than index k, nearest to k first, without copies of `exclude`, at most `limit`."""
    order = sorted((i for i in range(len(items)) if i != k), key=lambda i: (abs(i - k), i))
    out = dedupe_keep_order(items[i] for i in order if items[i].strip() and items[i] != exclude)
    return out[:limit]


def _units_sorted(by_id: Mapping[str, dict[str, LangText]], source: str, bad: BadRecords,
                  where: Mapping[str, str]) -> list[ParallelUnit]:
    units = []
    for uid in sorted(by_id):
        unit = ParallelUnit(id=uid, source=source, texts=dict(sorted(by_id[uid].items())))
        why = check_unit(unit)
        if why:
            bad(where[uid], why)
            continue
        units.append(unit)
    return units


# ------------------------------------------------------------------------------------------- SQuAD-style JSON

def _squad_paragraphs(path: PathLike, bad: BadRecords) -> Iterator[tuple[str, int, dict, int, dict]]:
    """(json path of the paragraph, article index, article, paragraph index, paragraph) of a SQuAD file, reporting
    structural errors to `bad`."""
    doc = load_json_file(path)
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise DataError(f"{path}: not SQuAD format (no top-level 'data' list)")
    for i, article in enumerate(data):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            bad(f"{path}: data[{i}]", "article without a 'paragraphs' list", file=str(path))
            continue
        for j, para in enumerate(paragraphs):
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) or not isinstance(
                    para.get("qas"), list):
                bad(f"{path}: data[{i}].paragraphs[{j}]", "paragraph needs a 'context' string and a 'qas' list",
                    file=str(path))
                continue
            yield f"{path}: data[{i}].paragraphs[{j}]", i, article, j, para


def _squad_records(path: PathLike, bad: BadRecords) -> Iterator[tuple[str, int, dict, int, dict, str]]:
    """(json path of the question, article index, article, paragraph index, paragraph, qa) of a SQuAD file,
    reporting structural errors to `bad`."""
    for where, i, article, j, para in _squad_paragraphs(path, bad):
        for k, qa in enumerate(para["qas"]):
            yield f"{where}.qas[{k}]", i, article, j, para, qa


def _qa_fields(qa: Any, context: str) -> tuple[str, str, int] | str:
    """(id, question, answer_start) of a SQuAD qa, or why it is unusable."""
    if not isinstance(qa, dict):
        return "qa is not an object"
    qid, question, answers = qa.get("id"), qa.get("question"), qa.get("answers")
    if not isinstance(qid, str) or not qid:
        return "qa without an 'id'"
    if not isinstance(question, str) or not question.strip():
        return f"qa {qid!r}: empty question"
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], dict):
        return f"qa {qid!r}: no answers"
    start = answers[0].get("answer_start")
    if not isinstance(start, int) or not 0 <= start < len(context):
        return f"qa {qid!r}: answer_start {start!r} is outside the context (length {len(context)})"
    return qid, question, start


# ----------------------------------------------------------------------------- LAReQA (XQuAD-R and MLQA-R)

def answer_sentence(breaks: Sequence[Sequence[int]], answer_start: int) -> int | None:
    """Index of the sentence whose half-open break [start, end) holds answer_start (None if no break does).

    Half-open, not closed: where breaks abut (zh, some hi and vi), an answer that opens a sentence starts at the
    previous sentence's end offset, and a closed interval would give the previous sentence.
    """
    for j, (start, end) in enumerate(breaks):
        if start <= answer_start < end:
            return j
    return None


@dataclasses.dataclass(frozen=True)
class LareqaQuestion:
    where: str  # the JSON path of the qa, for messages
    id: str
    question: str
    sentence: int  # index of the answer sentence in its paragraph's `sentences`


@dataclasses.dataclass(frozen=True)
class LareqaParagraph:
    """One paragraph of a LAReQA file: its candidate sentences (in order) and its questions."""

    article: int
    index: int  # within the article
    context: str
    sentences: tuple[str, ...]
    questions: tuple[LareqaQuestion, ...]


def read_lareqa(path: PathLike, bad: BadRecords, *, max_paragraphs: int = 0) -> Iterator[LareqaParagraph]:
    """The paragraphs of an XQuAD-R / MLQA-R file (SQuAD v1.1 JSON whose paragraphs carry `sentences` and as many
    `[start, end)` `sentence_breaks`), in file order: the one parser of the format, for training units
    (`read_squad_sentences`) and the LAReQA evaluator (`mlret.eval.lareqa`) alike. A question's answer sentence
    is the one whose break holds `answer_start` (`answer_sentence`). A paragraph without usable sentence breaks
    is reported once per question (and yields nothing), an unusable question on its own; `max_paragraphs` > 0
    stops after that many paragraphs."""
    for n, (where, a, _, p, para) in enumerate(_squad_paragraphs(path, bad)):
        if max_paragraphs and n >= max_paragraphs:
            return
        sentences, breaks = para.get("sentences"), para.get("sentence_breaks")
        if (not isinstance(sentences, list) or not isinstance(breaks, list) or len(sentences) != len(breaks)
                or not all(isinstance(b, list) and len(b) == 2 for b in breaks)):
            for k in range(len(para["qas"])):
                bad(f"{where}.qas[{k}]", "paragraph needs 'sentences' and as many [start, end) 'sentence_breaks'",
                    file=str(path))
            continue
        questions = []
        for k, qa in enumerate(para["qas"]):
            loc = f"{where}.qas[{k}]"
            fields = _qa_fields(qa, para["context"])
            if isinstance(fields, str):
                bad(loc, fields, file=str(path))
                continue
            qid, question, start = fields
            j = answer_sentence(breaks, start)
            if j is None:
                bad(loc, f"qa {qid!r}: answer_start {start} lies in no sentence break", file=str(path))
                continue
            questions.append(LareqaQuestion(loc, qid, question, j))
        yield LareqaParagraph(a, p, para["context"], tuple(sentences), tuple(questions))


def read_squad_sentences(files: Mapping[str, PathLike], *, source: str, paragraph_context: bool = False,
                         max_negatives: int = 16, on_bad: BadRecords | str = "error") -> list[ParallelUnit]:
    """XQuAD-R / MLQA-R: `files` maps a language code to its SQuAD+sentences JSON file (`read_lareqa`)."""
    bad = as_bad_records(on_bad)
    _check_lang_keys(files, source)
    by_id: dict[str, dict[str, LangText]] = collections.defaultdict(dict)
    where: dict[str, str] = {}
    for lang, path in sorted(files.items()):
        for para in read_lareqa(path, bad):
            for q in para.questions:
                if lang in by_id[q.id]:
                    bad(q.where, f"question id {q.id!r} appears twice in {lang}", file=str(path))
                    continue
                sentence = para.sentences[q.sentence]
                negatives = _nearest_first(para.sentences, q.sentence, max_negatives, sentence)
                if paragraph_context:
                    sentence = sentence_with_context(sentence, para.context)
                    negatives = tuple(sentence_with_context(s, para.context) for s in negatives)
                by_id[q.id][lang] = LangText(query=q.question, positive=sentence, negatives=negatives)
                where.setdefault(q.id, q.where)
    units = _units_sorted(by_id, source, bad, where)
    bad.log_summary(source)
    return units


PASSAGES = ("context", "sentence")  # what `read_squad_translated` can make the passage of a unit


def read_squad_translated(files: Mapping[str, PathLike], *, source: str, passage: str = "context",
                          id_pattern: str | None = None, max_negatives: int = 16,
                          on_bad: BadRecords | str = "error") -> list[ParallelUnit]:
    """SQuAD-format QA sets whose question ids link translations (MLQA dev/test `context-X-question-X` files,
    XTREME translate-train). `passage` is "context" (the paragraph) or "sentence" (the sentence holding the
    answer). `id_pattern` (a regex) turns a file's id into the linking id: group 1 if it has a group."""
    if passage not in PASSAGES:
        raise ValueError(f"passage={passage!r} is not context or sentence")
    bad = as_bad_records(on_bad)
    _check_lang_keys(files, source)
    pattern = re.compile(id_pattern) if id_pattern else None
    by_id: dict[str, dict[str, LangText]] = collections.defaultdict(dict)
    where: dict[str, str] = {}
    for lang, path in sorted(files.items()):
        for loc, _, article, j, para, qa in _squad_records(path, bad):
            fields = _qa_fields(qa, para["context"])
            if isinstance(fields, str):
                bad(loc, fields, file=str(path))
                continue
            qid, question, start = fields
            if pattern is not None:
                m = pattern.search(qid)
                if m is None:
                    bad(loc, f"id {qid!r} does not match id_pattern {id_pattern!r}", file=str(path))
                    continue
                qid = m.group(1) if m.groups() else m.group(0)
            if lang in by_id[qid]:
                bad(loc, f"question id {qid!r} appears twice in {lang}", file=str(path))
                continue
            context = para["context"]
            if passage == "context":
                contexts = [p.get("context", "") if isinstance(p, dict) else "" for p in article["paragraphs"]]
                positive, negatives = context, _nearest_first(contexts, j, max_negatives, context)
            else:
                spans = split_sentences(context)
                # The last sentence starting at or before the answer (an answer may start in a cut's
                # whitespace).
                k = max(i for i, (s0, _) in enumerate(spans) if s0 <= start) if start >= spans[0][0] else 0
                texts = [context[s0:s1] for s0, s1 in spans]
                positive, negatives = texts[k], _nearest_first(texts, k, max_negatives, texts[k])
            by_id[qid][lang] = LangText(query=question, positive=positive, negatives=negatives)
            where.setdefault(qid, loc)
    units = _units_sorted(by_id, source, bad, where)
    bad.log_summary(source)
    return units


def read_tydiqa_goldp(path: PathLike, *, source: str = "tydiqa_goldp", languages: Iterable[str] | None = None,
                      on_bad: BadRecords | str = "error") -> list[ParallelUnit]:
    """TyDi QA GoldP (SQuAD v1.1 format): one monolingual unit per question, passage = the gold passage.
    GoldP has one passage per question, so units carry no hard negatives (the batch fills them, see
    `mlret.data.pipeline`)."""
    bad = as_bad_records(on_bad)
    keep = set(languages) if languages else None
    units, seen = [], set()
    for loc, _, _, _, para, qa in _squad_records(path, bad):
        fields = _qa_fields(qa, para["context"])
        if isinstance(fields, str):
            bad(loc, fields, file=str(path))
            continue
        qid, question, _ = fields
        # GoldP ids start with the language's name: "arabic-2387335860751143628-1".
        lang = datasets.TYDIQA_GOLDP.codes_by_name.get(qid.split("-", 1)[0])
        if lang is None:
            bad(loc, f"id {qid!r} does not start with a TyDi QA language name "
                     f"({', '.join(datasets.TYDIQA_GOLDP.names.values())})", file=str(path))
            continue
        if keep is not None and lang not in keep:
            continue
        if qid in seen:
            bad(loc, f"question id {qid!r} appears twice", file=str(path))
            continue
        seen.add(qid)
        unit = ParallelUnit(id=qid, source=source, texts={lang: LangText(query=question, positive=para["context"])})
        why = check_unit(unit)
        if why:
            bad(loc, why, file=str(path))
            continue
        units.append(unit)
    bad.log_summary(source)
    return units


# -------------------------------------------------------------------------------------------------- TSV
# formats

def _tsv_rows(path: PathLike, ncols: int, bad: BadRecords, *, sep: str | None = "\t") -> Iterator[
        tuple[int, list[str]]]:
    """(line number, fields) of a TSV (or whitespace-separated, sep=None) file with `ncols` columns."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            fields = line.split(sep) if sep is not None else line.split()
            if len(fields) != ncols:
                bad(f"{path}:{lineno}", f"expected {ncols} fields, found {len(fields)}", file=str(path))
                continue
            yield lineno, fields


def _read_id_text(path: PathLike, keep: set[str] | None, bad: BadRecords) -> dict[str, tuple[str, int]]:
    """id -> (text, line) of a `id \\t text` file, only for ids in `keep` (None: all)."""
    out: dict[str, tuple[str, int]] = {}
    for lineno, (key, text) in _tsv_rows(path, 2, bad):
        if keep is not None and key not in keep:
            continue
        if not text.strip():
            bad(f"{path}:{lineno}", f"empty text for id {key!r}", file=str(path))
            continue
        out.setdefault(key, (text, lineno))
    return out


def read_mmarco(queries: Mapping[str, PathLike], collection: Mapping[str, PathLike],
                triples: PathLike | Mapping[str, PathLike], *, source: str = "mmarco", max_units: int | None = None,
                max_negatives: int = 16, on_bad: BadRecords | str = "error") -> list[ParallelUnit]:
    """mMARCO: `queries[lang]` (qid \\t text), `collection[lang]` (pid \\t text) and id triples
    (qid \\t positive pid \\t negative pid), one file shared by all languages (ids are the same in every
    translation) or one per language. One unit per query id (the first `max_units` of the triples): its first
    positive and up to `max_negatives` distinct negatives, in every language whose files have all of them.
    Only the referenced passages are kept in memory (the collections hold 8.8M passages per language)."""
    bad = as_bad_records(on_bad)
    _check_lang_keys(queries, source)
    if set(queries) != set(collection):
        raise DataError(f"mMARCO: queries cover {sorted(queries)} but collections cover {sorted(collection)}")
    triple_files = [triples] if not isinstance(triples, Mapping) else [triples[k] for k in sorted(triples)]
    pos: dict[str, list[str]] = {}
    neg: dict[str, list[str]] = collections.defaultdict(list)
    where: dict[str, str] = {}
    for tpath in triple_files:
        for lineno, (qid, p, n) in _tsv_rows(tpath, 3, bad):
            if qid not in pos:
                if max_units is not None and len(pos) >= max_units:
                    continue
                pos[qid] = []
                where[qid] = f"{tpath}:{lineno}"
            if p not in pos[qid]:
                pos[qid].append(p)
            if n not in neg[qid] and n not in pos[qid] and len(neg[qid]) < max_negatives:
                neg[qid].append(n)
    pids = {p for ps in pos.values() for p in ps[:1]} | {n for ns in neg.values() for n in ns}
    by_id: dict[str, dict[str, LangText]] = collections.defaultdict(dict)
    for lang in sorted(queries):
        q_text = _read_id_text(queries[lang], set(pos), bad)
        p_text = _read_id_text(collection[lang], pids, bad)
        for qid, ps in pos.items():
            if qid not in q_text:
                bad(where[qid], f"query {qid} is not in {queries[lang]}", file=str(queries[lang]))
                continue
            if ps[0] not in p_text:
                bad(where[qid], f"positive passage {ps[0]} is not in {collection[lang]}", file=str(collection[lang]))
                continue
            missing = [n for n in neg[qid] if n not in p_text]
            for n in missing:
                bad(where[qid], f"negative passage {n} is not in {collection[lang]}", file=str(collection[lang]))
            negs = dedupe_keep_order(p_text[n][0] for n in neg[qid] if n in p_text)
            by_id[qid][lang] = LangText(query=q_text[qid][0], positive=p_text[ps[0]][0],
                                        negatives=tuple(t for t in negs if t != p_text[ps[0]][0]))
    units = _units_sorted(by_id, source, bad, where)
    bad.log_summary(source)
    return units


def read_trec_retrieval(lang: str, topics: PathLike, qrels: PathLike, corpus: Sequence[PathLike], *,
                        source: str, max_negatives: int = 16, on_bad: BadRecords | str = "error") -> list[ParallelUnit]:
    """MIRACL / Mr. TyDi training data in one language: TREC topics (qid \\t query), qrels (qid Q0 docid
    relevance) and corpus jsonl files ({"docid"|"id", "title"?, "text"|"contents"}). A unit per judged query:
    positive = its first relevant passage, negatives = its judged non-relevant passages (up to
    `max_negatives`). Passage text is "title text" when the corpus has titles. Topics without judgments (none
    relevant) are not units and are counted in the log."""
    bad = as_bad_records(on_bad)
    if lang not in LANG_INDEX:
        raise DataError(f"{topics}: unknown language code {lang!r} (mlret.data.LANGUAGES)")
    q_text = _read_id_text(topics, None, bad)
    judged: dict[str, tuple[list[str], list[str]]] = collections.defaultdict(lambda: ([], []))
    where: dict[str, str] = {}
    for lineno, (qid, _, docid, rel) in _tsv_rows(qrels, 4, bad, sep=None):
        try:
            relevance = int(rel)
        except ValueError:
            bad(f"{qrels}:{lineno}", f"relevance {rel!r} is not an integer", file=str(qrels))
            continue
        if qid not in q_text:
            bad(f"{qrels}:{lineno}", f"query {qid} is not in {topics}", file=str(qrels))
            continue
        where.setdefault(qid, f"{qrels}:{lineno}")
        judged[qid][0 if relevance > 0 else 1].append(docid)
    needed = {d for p, n in judged.values() for d in p + n}
    docs: dict[str, str] = {}
    for cpath in corpus:
        with open_text(cpath) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(f"{cpath}:{lineno}", f"malformed JSON: {e.msg}", file=str(cpath))
                    continue
                docid = obj.get("docid", obj.get("id")) if isinstance(obj, dict) else None
                if docid is None:
                    bad(f"{cpath}:{lineno}", "corpus record without 'docid' (or 'id')", file=str(cpath))
                    continue
                if docid not in needed:
                    continue
                text = obj.get("text", obj.get("contents"))
                if not isinstance(text, str) or not text.strip():
                    bad(f"{cpath}:{lineno}", f"passage {docid} has no text", file=str(cpath))
                    continue
                title = obj.get("title") or ""
                docs[docid] = f"{title} {text}" if title else text
    units = []
    unjudged = len(set(q_text) - set(judged))
    for qid in sorted(judged):
        positives, negatives = judged[qid]
        for d in positives + negatives:
            if d not in docs:
                bad(where[qid], f"passage {d} judged for query {qid} is not in the corpus files", file=str(qrels))
        positives = [d for d in positives if d in docs]
        if not positives:  # judged but nothing relevant (MIRACL has such topics), or reported missing above
            continue
        pos_text = docs[positives[0]]
        negs = dedupe_keep_order(docs[d] for d in negatives if d in docs and docs[d] != pos_text)[:max_negatives]
        unit = ParallelUnit(id=f"{lang}:{qid}", source=source,
                            texts={lang: LangText(query=q_text[qid][0], positive=pos_text, negatives=negs)})
        why = check_unit(unit)
        if why:
            bad(where[qid], why, file=str(qrels))
            continue
        units.append(unit)
    no_pos = len(judged) - len(units)
    if unjudged or no_pos:
        log.info("%s (%s): %d topics without judgments and %d without a relevant passage in the corpus are not "
                 "units", source, lang, unjudged, no_pos)
    bad.log_summary(f"{source} ({lang})")
    return units


# ------------------------------------------------------------------------------------------------- user units

def read_units_jsonl(paths: PathLike | Sequence[PathLike], *, on_bad: BadRecords | str = "error",
                     default_source: str = "jsonl") -> list[ParallelUnit]:
    """User units: one unit JSON object (`mlret.data.units`) per line (blank lines allowed); ids must be unique."""
    bad = as_bad_records(on_bad)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    units, seen = [], {}
    for path in paths:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                loc = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(loc, f"malformed JSON (column {e.colno}): {e.msg}", file=str(path))
                    continue
                try:
                    unit = unit_from_json(obj, default_source=default_source)
                except ValueError as e:
                    bad(loc, str(e), file=str(path))
                    continue
                if unit.id in seen:
                    bad(loc, f"unit id {unit.id!r} already used at {seen[unit.id]}", file=str(path))
                    continue
                seen[unit.id] = loc
                units.append(unit)
    bad.log_summary("jsonl units")
    return units
