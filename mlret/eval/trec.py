"""MIRACL and Mr. TyDi: TREC topics and qrels against a passage corpus; nDCG@10, Recall@100 and MRR@100.

Per language: encode the topics (queries) and the corpus (passages, `title` + `text`; each process only its shard,
`mlret.eval.sharded`), retrieve the top k (exact search up to the configured pool size, ScaNN above it, each host
on its shard, merged; with ScaNN, recall against exact search on a sample of topics is measured and reported as
`search_recall_min`, a warning below `config.eval.retrieval.recall_floor`), and score the run like
trec_eval (`metrics.trec_metrics`: ties by docid, relevance = grade >= 1, only queries with qrels). The summary is
the unweighted mean over languages.

File layouts (as published by Pyserini's anserini-tools, the files in ../shared/data):
* MIRACL:   topics.miracl-v1.0-{lang}-{split}.tsv, qrels.miracl-v1.0-{lang}-{split}.tsv
* Mr. TyDi: topics.mrtydi-v1.1-{lang}.{split}.txt.gz, qrels.mrtydi-v1.1-{lang}.{split}.txt
Topics are `qid<TAB>text`; qrels are `qid Q0 docid grade`. The corpora are not in ../shared/data: the config
names them (`corpus`, a path with `{lang}`, local or gs://) in either form of `mlret.eval.corpus`: a .jsonl /
.jsonl.gz file or a folder of such shards with one record per line, MIRACL's `{"docid", "title", "text"}` or
Mr. TyDi's `{"id", "contents"}` (its docs.jsonl), as the training readers take them; or the same records as an
.array_record file or folder of shards (`python -m mlret.eval.corpus --to-array-record`), which each process
reads its exact share of by record count.

A corpus path without `{lang}` is shared by the topic languages and encoded once per evaluation. With
`config.eval.retrieval.per_language_index` and approximate search, the index is built per passage language: the
records' `"lang"` field, or, when the records carry none, the topic language for a per-language corpus (a path
with `{lang}`); a shared corpus without `"lang"` fields cannot honour the option and is an error (exact search
needs no languages: one exact index per language gives the same lists). A language whose qrels name no
docid of the corpus is logged as a warning naming both files (its scores would be silent zeros).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from mlret import storage
from mlret.data import datasets
from mlret.errors import DataError
from mlret.eval import metrics as M
from mlret.eval.base import Embedder, EvalContext, EvalResult, EvaluatorSpec, PerQuery, embed, macro_mean, parse_list
from mlret.eval.corpus import open_text
from mlret.eval.retrieval import RetrievalOptions, describe_search, search_summary
from mlret.eval.sharded import (
    CorpusShard,
    encode_corpus_shard,
    gathered,
    global_docids,
    global_options,
    sharded_topk,
)

log = logging.getLogger(__name__)

LAYOUTS = {
    "miracl": ("topics.miracl-v1.0-{lang}-{split}.tsv", "qrels.miracl-v1.0-{lang}-{split}.tsv"),
    "mrtydi": ("topics.mrtydi-v1.1-{lang}.{split}.txt.gz", "qrels.mrtydi-v1.1-{lang}.{split}.txt"),
}


def read_topics(path: str) -> dict[str, str]:
    """`qid<TAB>query` lines -> {qid: query}, in file order."""
    topics: dict[str, str] = {}
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t", 1)
            if len(parts) != 2:
                raise DataError(f"{path}:{n}: expected 'qid<TAB>query', got {line[:80]!r}")
            topics[parts[0].strip()] = parts[1].strip()
    return topics


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """`qid Q0 docid grade` lines (tabs or spaces) -> {qid: {docid: grade}}."""
    qrels: dict[str, dict[str, int]] = {}
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise DataError(f"{path}:{n}: expected 'qid Q0 docid grade', got {line.strip()[:80]!r}")
            try:
                grade = int(parts[3])
            except ValueError:
                raise DataError(f"{path}:{n}: grade {parts[3]!r} is not an integer") from None
            qrels.setdefault(parts[0], {})[parts[2]] = grade
    return qrels


class TrecEvaluator:
    """MIRACL or Mr. TyDi dev/test: dense retrieval over a corpus, scored like trec_eval."""

    def __init__(self, name: str, layout: str, data_dir: str, corpus: str, languages: Sequence[str], *,
                 split: str = "dev", top_k: int = 100, max_queries: int = 0,
                 passage_template: str = "{title} {text}", retrieval: RetrievalOptions | None = None):
        self.name = name
        self.layout = layout
        self.data_dir = data_dir
        self.corpus = corpus
        self.languages = list(languages)
        self.split = split
        self.top_k = top_k
        self.max_queries = max_queries
        self.passage_template = passage_template
        self.retrieval = retrieval or RetrievalOptions()
        self._queries: dict[str, tuple[dict[str, str], dict[str, dict[str, int]]]] = {}

    def paths(self, lang: str) -> tuple[str, str, str]:
        topics, qrels = (os.path.join(self.data_dir, p.format(lang=lang, split=self.split))
                         for p in LAYOUTS[self.layout])
        return topics, qrels, self.corpus.format(lang=lang, split=self.split)

    def queries(self, lang: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
        """Topics that have qrels (trec_eval scores only those), cut to max_queries, and the qrels."""
        if lang in self._queries:
            return self._queries[lang]
        topics_path, qrels_path, _ = self.paths(lang)
        for p in (topics_path, qrels_path):
            if not storage.path(p).exists():
                raise FileNotFoundError(f"{p}: missing; check config.eval.{self.name}.data_dir / split / "
                                        "languages")
        topics, qrels = read_topics(topics_path), read_qrels(qrels_path)
        kept = {q: t for q, t in topics.items() if q in qrels}
        if self.max_queries:
            kept = dict(list(kept.items())[: self.max_queries])
        self._queries[lang] = kept, {q: qrels[q] for q in kept}
        return self._queries[lang]

    def shared_corpus(self) -> bool:
        """Whether every topic language searches the same corpus (a path without `{lang}` / `{split}` per lang)."""
        return len({self.paths(lang)[2] for lang in self.languages}) == 1 and len(self.languages) > 1

    def _shard(self, embedder: Embedder, path: str, shards: dict[str, CorpusShard]) -> CorpusShard:
        """This host's encoded shard of the corpus at `path`, encoded once per evaluation (kept in `shards` while
        another language still needs it)."""
        if path not in shards:
            shards[path] = encode_corpus_shard(embedder, path, passage_template=self.passage_template,
                                               dtype=self.retrieval.corpus_dtype)
        return shards[path]

    def _candidate_languages(self, shard: CorpusShard, lang: str, path: str) -> list[str] | None:
        """The passages' languages for the per-language index (None without it, or for exact search, where one
        index per language gives the same lists; see the module docstring)."""
        if not self.retrieval.per_language_index or global_options(self.retrieval, shard.total).method == "exact":
            return None
        tagged = gathered(np.array([shard.languages is not None or not shard.docids], dtype=bool))
        if tagged.all():
            return shard.languages or []
        if self.shared_corpus():
            raise DataError(f"{path}: config.eval.retrieval.per_language_index is set, but this corpus is shared by "
                            f"the topic languages ({', '.join(self.languages)}) and its records carry no 'lang' "
                            "field: add one to every record, or unset per_language_index")
        return [lang] * len(shard.docids)  # a per-language corpus: its passages are in the topic language

    def _check_qrels(self, lang: str, shard: CorpusShard) -> float:
        """Share of the judged docids (of the kept topics) found in the corpus; none at all is a warning."""
        _, qrels = self.queries(lang)
        judged = {d for q in qrels.values() for d in q}
        local = len(judged & set(shard.docids))
        found = int(gathered(np.array([local], dtype=np.int64)).sum())
        if judged and not found:
            topics, qrels_path, corpus = self.paths(lang)
            log.warning("%s/%s: none of the %d docids judged in %s is in the corpus %s: every score of this "
                        "language is zero; check that the qrels and the corpus belong together", self.name, lang,
                        len(judged), qrels_path, corpus)
        return found / len(judged) if judged else float("nan")

    def retrieve(self, embedder: Embedder, lang: str, shards: dict[str, CorpusShard] | None = None,
                 ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        """The run {qid: {docid: score}} of the top k passages per topic, and how it was searched.

        The corpus is spread over the processes (`mlret.eval.sharded`): each reads, encodes and searches its
        shard only, and the hosts' top k are merged; in one process the shard is the whole corpus. `shards`
        keeps encoded corpora between the languages of one evaluation."""

        topics, _ = self.queries(lang)
        _, _, corpus_path = self.paths(lang)
        q = embed(embedder.queries, list(topics.values()), f"{self.name}/{lang} topics")
        shard = self._shard(embedder, corpus_path, {} if shards is None else shards)
        log.info("%s/%s: %d topics against %d passages (%d on this host)", self.name, lang, len(topics),
                 shard.total, len(shard.docids))
        top = sharded_topk(q, shard.embeddings, shard.offset, self.top_k, self.retrieval,
                           languages=self._candidate_languages(shard, lang, corpus_path), name=f"{self.name}/{lang}")
        docids = global_docids(top.indices, shard)
        run = {qid: {d: float(s) for d, s in zip(docids[i], top.scores[i])} for i, qid in enumerate(topics)}
        return run, {**top.info, "qrels_docids_in_corpus": self._check_qrels(lang, shard)}

    def run(self, embedder: Embedder, output_dir: str | None = None) -> EvalResult:
        """Summary: macro means over languages; per query: setting "queries", one row per scored topic."""
        names = {"ndcg10": "ndcg_cut_10", "recall100": "recall_100", "mrr100": "recip_rank_100"}
        per_lang: dict[str, dict[str, float]] = {}
        search: dict[str, Any] = {}
        rows = []
        shards: dict[str, CorpusShard] = {}
        for i, lang in enumerate(self.languages):
            run, info = self.retrieve(embedder, lang, shards)
            later = {self.paths(x)[2] for x in self.languages[i + 1:]}
            for path in [p for p in shards if p not in later]:  # no later language searches it: free it
                del shards[path]
            _, qrels = self.queries(lang)
            per_query = M.trec_metrics(run, qrels, ndcg_k=(10,), recall_k=(100,), rr_k=(100,))
            means = M.mean_metrics(per_query)
            per_lang[lang] = {k: means[trec] for k, trec in names.items()} | {"queries": len(per_query)}
            rows.append(PerQuery(list(per_query), [lang] * len(per_query),
                                 {k: np.array([m[trec] for m in per_query.values()]) for k, trec in names.items()}))
            search[lang] = info
        summary = {k: macro_mean({x: m[k] for x, m in per_lang.items()}) for k in names}
        summary["mrr"] = summary["mrr100"]
        summary.update(search_summary(list(search.values())))
        return EvalResult(summary=summary, details={
            "languages": per_lang, "search": search, "index": describe_search(list(search.values())),
            "options": {"data_dir": self.data_dir, "corpus": self.corpus, "split": self.split, "top_k": self.top_k,
                        "max_queries": self.max_queries}}, per_query={"queries": PerQuery.concat(rows)})


# ------------------------------------------------------------------------------------------------ registry

def _defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.data_dir = ""  # topics + qrels; "": <data.data_dir>/{miracl,mrtydi}
    s.corpus = ""  # per language, with {lang}: a jsonl(.gz) or .array_record file or folder of shards (one form)
    s.languages = ""  # "": all languages of the set
    s.split = "dev"
    s.top_k = 100
    s.max_queries = 0  # >0: first queries per language only (fast subset)
    s.passage_template = "{title} {text}"
    return s


def _validate(sec: ml_collections.ConfigDict, ctx: EvalContext) -> None:
    if sec.top_k < 100:
        raise ctx.fail("top_k", f"{sec.top_k} < 100 cannot give Recall@100 / MRR@100")
    if ctx.active and not sec.corpus:
        raise ctx.fail("corpus", "empty; name the corpus jsonl or ArrayRecord file or folder (a path with {lang})")


def _files(ev: TrecEvaluator) -> list[str]:
    return list(dict.fromkeys(f for lang in ev.languages for f in ev.paths(lang)))  # a shared corpus once


def _spec(name: str, dataset: datasets.Dataset) -> EvaluatorSpec:
    def build(sec: ml_collections.ConfigDict, ctx: EvalContext) -> TrecEvaluator:
        return TrecEvaluator(name, name, ctx.data_dir, sec.corpus, parse_list(sec.languages) or dataset.languages,
                             split=sec.split, top_k=sec.top_k, max_queries=sec.max_queries,
                             passage_template=sec.passage_template,
                             retrieval=RetrievalOptions.from_config(ctx.config.eval.retrieval))

    return EvaluatorSpec(name, _defaults, build, _validate, _files, data_subdir=name, origin=dataset.origin,
                         files_field=f"data_dir / config.eval.{name}.corpus", protocol=PROTOCOL)


# The model card's text above the evaluator's table.
PROTOCOL = "Passage retrieval against the topics' qrels: nDCG@10, recall@100, MRR@100 (trec_eval conventions)."


EVALUATORS = (
    _spec("miracl", datasets.MIRACL),
    _spec("mrtydi", datasets.MRTYDI),
)
