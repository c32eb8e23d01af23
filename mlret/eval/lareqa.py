"""The LAReQA protocol (arXiv 2004.05484) on XQuAD-R and MLQA-R: monolingual, cross-lingual and multilingual
answer-sentence retrieval, with AP over the full ranking, MRR, R@1, R@10, accuracy@1 and language bias.

Data: one SQuAD v1.1 JSON per language whose paragraphs carry `sentences` and `sentence_breaks` (`[start, end)`
character offsets), read by `mlret.data.readers.read_lareqa`, the parser that makes the training units too.
Candidates are every sentence of every paragraph, keyed by (language, article, paragraph, sentence index) and
never by text (a few sentences repeat). A question's relevant sentence in its language is the
one whose half-open break holds `answer_start`; question ids are shared across languages, so the same id gives
the relevant sentence in every other language the question exists in.

Settings:
* mono: queries in X against X's candidates;
* cross: queries in X against Y's candidates, X != Y (only the questions that exist in Y);
* multi: queries in X against the union of every language's candidates, with one relevant sentence per language
  the question exists in.
Every metric is a mean over a query language's questions, then an unweighted mean over query languages (for
cross: over the target languages of a query language first). All metrics come from the exact ranks of the
relevant candidates in the full ranking (`retrieval.relevant_ranks`), ties broken by candidate index, or, with
`config.eval.retrieval.rank_with_index`, from the index's top k (`retrieval.index_ranks`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from mlret import storage
from mlret.data import datasets
from mlret.data.readers import read_lareqa
from mlret.errors import DataError
from mlret.eval import metrics as M
from mlret.eval.base import (
    Embedder,
    EvalContext,
    EvalResult,
    EvaluatorSpec,
    PerQuery,
    embed,
    heatmap,
    macro_mean,
    parse_list,
    write_json,
)
from mlret.eval.retrieval import RetrievalOptions, describe_search, full_ranks, index_ranks, search_summary

log = logging.getLogger(__name__)

SETTINGS = ("mono", "cross", "multi")


@dataclasses.dataclass
class LareqaLanguage:
    """One language of XQuAD-R / MLQA-R: its candidate sentences and its questions."""

    lang: str
    path: str
    sentences: list[str]  # candidate texts, in (article, paragraph, sentence) order
    paragraphs: list[str]  # the paragraph (context) of each candidate
    keys: list[tuple[int, int, int]]  # (article, paragraph, sentence index) of each candidate
    question_ids: list[str]
    questions: list[str]
    gold: np.ndarray  # [n_questions] index of the relevant candidate within this language

    def gold_by_id(self) -> dict[str, int]:
        return dict(zip(self.question_ids, self.gold.tolist()))


def _raise(where: str, why: str, *, file: str | None = None) -> None:
    raise DataError(f"{where}: {why}")


def load_language(path: str, lang: str, max_paragraphs: int = 0) -> LareqaLanguage:
    """Read one XQuAD-R / MLQA-R language file (`mlret.data.readers.read_lareqa`, the parser training uses too;
    any malformed record is an error). `max_paragraphs` > 0 keeps only the first paragraphs (in file order) and
    their questions: a fast subset for smoke runs, not the benchmark."""
    if not storage.path(path).is_file():
        raise FileNotFoundError(f"{path}: missing; set the evaluator's data_dir (config.eval.<name>.data_dir) "
                                "to the folder with one <lang>.json per language")
    out = LareqaLanguage(lang, path, [], [], [], [], [], np.zeros(0, np.int64))
    gold: list[int] = []
    for para in read_lareqa(path, _raise, max_paragraphs=max_paragraphs):
        first = len(out.sentences)
        out.sentences += para.sentences
        out.paragraphs += [para.context] * len(para.sentences)
        out.keys += [(para.article, para.index, s) for s in range(len(para.sentences))]
        for q in para.questions:
            out.question_ids.append(q.id)
            out.questions.append(q.question)
            gold.append(first + q.sentence)
    if len(set(out.question_ids)) != len(out.question_ids):
        raise DataError(f"{path}: question ids repeat within the language")
    out.gold = np.asarray(gold, dtype=np.int64)
    return out


def load(data_dir: str, languages: Sequence[str], max_paragraphs: int = 0) -> dict[str, LareqaLanguage]:
    """Read every language of a LAReQA set, in the given order."""
    return {lang: load_language(os.path.join(data_dir, f"{lang}.json"), lang, max_paragraphs)
            for lang in languages}


def _per_query(ranks: np.ndarray, n_rel: np.ndarray, map_k: int, multi: bool,
               cap: float = np.inf) -> dict[str, np.ndarray]:
    """Per-query metrics; `cap`: for the rank distance, the rank of a relevant item the (truncated) ranking
    does not hold."""
    out = {
        "map": M.average_precision(ranks, n_rel),
        "mrr": M.reciprocal_rank(ranks),
        "r1": M.recall_at_k(ranks, n_rel, 1),
        "r10": M.recall_at_k(ranks, n_rel, 10),
        "acc1": M.hit_at_k(ranks, 1),
    }
    if map_k:
        out[f"map_at_{map_k}"] = M.average_precision(ranks, n_rel, k=map_k)
    if multi:
        held = np.arange(ranks.shape[1])[None, :] < n_rel[:, None]
        out["rank_distance"] = M.rank_distance(np.where(held & np.isinf(ranks), cap, ranks))
    return out


def _means(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) if len(v) else float("nan") for k, v in per_query.items()}


def multi_relevant(langs: dict[str, LareqaLanguage]) -> dict[str, list[list[int]]]:
    """The multilingual setting's gold: per query language, for each of its questions, the indices of the answer
    sentences of every language in the pool of all candidates (the languages' sentences concatenated in order)."""
    order = list(langs)
    offsets = np.cumsum([0] + [len(langs[x].sentences) for x in order])
    golds = {x: langs[x].gold_by_id() for x in order}
    return {x: [[int(offsets[j]) + golds[y][q] for j, y in enumerate(order) if q in golds[y]]
                for q in langs[x].question_ids] for x in order}


def evaluate_embeddings(langs: dict[str, LareqaLanguage], query_emb: dict[str, np.ndarray],
                        cand_emb: dict[str, np.ndarray], settings: Sequence[str] = SETTINGS,
                        map_k: int = 0, retrieval: RetrievalOptions | None = None) -> EvalResult:
    """All LAReQA metrics from per-language query and candidate embeddings (pure: no model, no I/O).

    `details` holds the per-language tables (`mono[x]`, `cross[x][y]`, `multi[x]`: means over the queries),
    `per_query` the values they average: "mono" and "multi" one row per question of each query language, "cross"
    one row per question and target language (`targets`).

    With `retrieval.rank_with_index`, ranks come from the index's top `rank_k` (per language in the multilingual
    pool with `per_language_index`) instead of the full exact ranking: the metrics of the truncated ranking, the
    rank distance counting an unranked relevant sentence as rank_k + 1; the searches' info (recall against exact
    search) is in details["search"]."""
    search: dict[str, list] = {}
    use_index = retrieval is not None and retrieval.rank_with_index
    rank = index_ranks(retrieval, "lareqa", search) if use_index else full_ranks
    cap = retrieval.rank_k + 1.0 if use_index else np.inf
    order = list(langs)
    all_cands = np.concatenate([cand_emb[x] for x in order], axis=0)
    golds = {x: langs[x].gold_by_id() for x in order}
    multi = multi_relevant(langs) if "multi" in settings else {}
    cand_lang = np.repeat(order, [len(cand_emb[x]) for x in order])
    result: dict[str, Any] = {"languages": order, "mono": {}, "cross": {}, "multi": {}, "queries": {}}
    rows: dict[str, list[PerQuery]] = {s: [] for s in settings}

    for x in order:
        qx = query_emb[x]
        result["queries"][x] = len(langs[x].question_ids)
        if "mono" in settings or "cross" in settings:
            for y in order:
                if (x == y and "mono" not in settings) or (x != y and "cross" not in settings):
                    continue
                keep = [i for i, q in enumerate(langs[x].question_ids) if q in golds[y]]
                if not keep:
                    continue
                rel = [[golds[y][langs[x].question_ids[i]]] for i in keep]
                ranks = rank(qx[keep], cand_emb[y], rel, [y] * len(cand_emb[y]))
                values = _per_query(ranks, np.ones(len(keep)), map_k, multi=False)
                m = _means(values)
                m["queries"] = len(keep)
                ids = [langs[x].question_ids[i] for i in keep]
                if x == y:
                    result["mono"][x] = m
                    rows["mono"].append(PerQuery(ids, [x] * len(ids), values))
                else:
                    result["cross"].setdefault(x, {})[y] = m
                    rows["cross"].append(PerQuery(ids, [x] * len(ids), values, targets=[y] * len(ids)))
        if "multi" in settings:
            rel = multi[x]
            ranks = rank(qx, all_cands, rel, cand_lang)
            n_rel = np.array([len(r) for r in rel], dtype=np.float64)
            values = _per_query(ranks, n_rel, map_k, multi=True, cap=cap)
            rows["multi"].append(PerQuery(list(langs[x].question_ids), [x] * len(rel), values))
            m = _means(values)
            m["queries"] = len(rel)
            m["mean_relevant"] = float(n_rel.mean()) if len(n_rel) else float("nan")
            result["multi"][x] = m

    if search:
        result["search"] = search["lareqa"]
    result["candidates"] = {x: len(langs[x].sentences) for x in order}
    result["candidates_total"] = len(all_cands)
    summary = summarize(result, map_k)
    summary.update(search_summary(result.get("search", [])))  # approximate search: recall, fallbacks, short lists
    if "search" in result:
        result["index"] = describe_search(result["search"])
    return EvalResult(summary=summary, details=result,
                      per_query={s: PerQuery.concat(parts) for s, parts in rows.items() if parts})


def summarize(result: dict[str, Any], map_k: int = 0) -> dict[str, float]:
    """Flat summary: per setting, macro averages over query languages (cross: over targets first)."""
    names = ["map", "mrr", "r1", "r10", "acc1"] + ([f"map_at_{map_k}"] if map_k else [])
    s: dict[str, float] = {}
    if result["mono"]:
        for n in names:
            s[f"mono_{n}"] = macro_mean({x: m[n] for x, m in result["mono"].items()})
    if result["cross"]:
        for n in names:
            s[f"cross_{n}"] = macro_mean({x: macro_mean({y: m[n] for y, m in row.items()})
                                          for x, row in result["cross"].items()})
    if result["multi"]:
        for n in names + ["rank_distance"]:
            s[f"multi_{n}"] = macro_mean({x: m[n] for x, m in result["multi"].items()})
        s["mrr"] = s["multi_mrr"]
        s["rank_distance"] = s["multi_rank_distance"]
    return s


def pair_matrix(result: dict[str, Any], metric: str) -> np.ndarray:
    """Query language x candidate language matrix of a metric; the diagonal is the monolingual setting."""
    order = result["languages"]
    m = np.full((len(order), len(order)), np.nan)
    for i, x in enumerate(order):
        for j, y in enumerate(order):
            block = result["mono"].get(x) if x == y else result["cross"].get(x, {}).get(y)
            if block is not None:
                m[i, j] = block[metric]
    return m


def save_matrices(result: dict[str, Any], name: str, output_dir: str, plots: bool = True) -> list[str]:
    """Write the per-pair and per-language matrices as JSON and (with `plots`) heatmap PNGs; returns paths."""
    order = result["languages"]
    written = []
    pair_metrics = ["map", "mrr", "r1", "acc1"]
    multi_metrics = ["map", "mrr", "r10", "acc1"]
    data = {"languages": order,
            "pairs": {k: pair_matrix(result, k).tolist() for k in pair_metrics},
            "multi": {k: [result["multi"][x][k] if x in result["multi"] else None for x in order]
                      for k in multi_metrics + ["rank_distance"]}}
    path = os.path.join(output_dir, f"{name}_matrices.json")
    write_json(path, data)
    written.append(path)
    if not plots:
        return written
    if result["mono"] or result["cross"]:
        for k in pair_metrics:
            path = os.path.join(output_dir, f"{name}_pairs_{k}.png")
            heatmap(path, pair_matrix(result, k), order, order,
                    f"{name}: {k}\nrows: query language, columns: candidates",
                    xlabel="candidate language", ylabel="query language")
            written.append(path)
    if result["multi"]:
        langs = [x for x in order if x in result["multi"]]
        m = np.array([[result["multi"][x][k] for x in langs] for k in multi_metrics])
        path = os.path.join(output_dir, f"{name}_multi.png")
        heatmap(path, m, multi_metrics, langs, f"{name}: multilingual pool, per query language",
                xlabel="query language")
        written.append(path)
        path = os.path.join(output_dir, f"{name}_multi_rank_distance.png")
        rd = np.array([[result["multi"][x]["rank_distance"] for x in langs]])
        heatmap(path, rd, ["rank distance"], langs, f"{name}: language bias (lower is better)",
                xlabel="query language", fmt="{:.0f}", vmin=None, vmax=None)
        written.append(path)
    return written


class LareqaEvaluator:
    """XQuAD-R or MLQA-R under the LAReQA protocol (see the module docstring)."""

    def __init__(self, name: str, data_dir: str, languages: Sequence[str], *, candidate_context: str = "none",
                 context_separator: str = " ", max_paragraphs: int = 0, map_k: int = 0,
                 settings: Sequence[str] = SETTINGS, plots: bool = True,
                 retrieval: RetrievalOptions | None = None):
        self.name = name
        self.data_dir = data_dir
        self.languages = list(languages)
        self.candidate_context = candidate_context
        self.context_separator = context_separator
        self.max_paragraphs = max_paragraphs
        self.map_k = map_k
        self.settings = tuple(settings)
        self.plots = plots
        self.retrieval = retrieval
        self._langs: dict[str, LareqaLanguage] | None = None

    @property
    def langs(self) -> dict[str, LareqaLanguage]:
        if self._langs is None:  # read once, reused at every periodic evaluation
            self._langs = load(self.data_dir, self.languages, self.max_paragraphs)
        return self._langs

    def candidate_texts(self, lang: LareqaLanguage) -> list[str]:
        if self.candidate_context == "none":
            return list(lang.sentences)
        return [s + self.context_separator + c for s, c in zip(lang.sentences, lang.paragraphs)]

    def run(self, embedder: Embedder, output_dir: str | None = None) -> EvalResult:
        langs = self.langs
        order = list(langs)
        questions = [q for x in order for q in langs[x].questions]
        candidates = [c for x in order for c in self.candidate_texts(langs[x])]
        log.info("%s: encoding %d questions and %d candidates (%d languages)", self.name, len(questions),
                 len(candidates), len(order))
        q_all = embed(embedder.queries, questions, f"{self.name} questions")
        c_all = embed(embedder.passages, candidates, f"{self.name} candidates")
        q_emb, c_emb = {}, {}
        qo = co = 0
        for x in order:
            nq, nc = len(langs[x].questions), len(langs[x].sentences)
            q_emb[x], c_emb[x] = q_all[qo:qo + nq], c_all[co:co + nc]
            qo, co = qo + nq, co + nc
        result = evaluate_embeddings(langs, q_emb, c_emb, self.settings, self.map_k, self.retrieval)
        result.details["options"] = {"data_dir": self.data_dir, "candidate_context": self.candidate_context,
                                     "max_paragraphs": self.max_paragraphs, "map_k": self.map_k,
                                     "settings": list(self.settings)}
        if output_dir:
            result.details["files"] = save_matrices(result.details, self.name, output_dir, self.plots)
        return result


# ------------------------------------------------------------------------------------------------ registry

def _defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.data_dir = ""  # "": <data.data_dir>/{xquad-r,mlqa-r}
    s.languages = ""  # comma-separated subset; "": all of the set's languages
    s.candidate_context = "none"  # none: the sentence alone | paragraph: sentence + separator + paragraph
    s.context_separator = " "
    s.settings = "mono,cross,multi"
    s.map_k = 0  # >0: also mAP@k (trec_eval map_cut_k); AP over the full ranking is always reported
    s.max_paragraphs = 0  # >0: only the first paragraphs of each language (a fast subset for smoke runs)
    return s


def _spec(name: str, dataset: datasets.Dataset, subdir: str) -> EvaluatorSpec:
    known = dataset.languages

    def validate(sec: ml_collections.ConfigDict, ctx: EvalContext) -> None:
        if sec.candidate_context not in ("none", "paragraph"):
            raise ctx.fail("candidate_context", f"{sec.candidate_context!r} is not none or paragraph")
        settings = parse_list(sec.settings)
        if not settings or any(s not in SETTINGS for s in settings):
            raise ctx.fail("settings", f"{sec.settings!r} must be a non-empty subset of {','.join(SETTINGS)}")
        for lang in parse_list(sec.languages):
            if lang not in known:
                raise ctx.fail("languages", f"{lang!r} is not one of {','.join(known)}")

    def build(sec: ml_collections.ConfigDict, ctx: EvalContext) -> LareqaEvaluator:
        return LareqaEvaluator(name, ctx.data_dir, parse_list(sec.languages) or known,
                               candidate_context=sec.candidate_context, context_separator=sec.context_separator,
                               max_paragraphs=sec.max_paragraphs, map_k=sec.map_k,
                               settings=parse_list(sec.settings), plots=ctx.config.eval.plots,
                               retrieval=RetrievalOptions.from_config(ctx.config.eval.retrieval))

    return EvaluatorSpec(name, _defaults, build, validate, data_subdir=subdir, origin=dataset.origin,
                         files=lambda ev: [os.path.join(ev.data_dir, f"{lang}.json") for lang in ev.languages],
                         protocol=PROTOCOL)


# The model card's text above the evaluator's table.
PROTOCOL = ("LAReQA answer-sentence retrieval: every question ranks candidate sentences; **mono** = the question's own "
            "language, **cross** = one other language (macro-averaged over targets), **multi** = the pool of all "
            "languages, where the answer sentence in every language is relevant. Exact search; mAP over the full "
            "ranking; rank distance = in the multilingual pool, the gap between the best- and worst-ranked relevant "
            "answers of a question (language bias, lower is better).")


EVALUATORS = (
    _spec("xquad_r", datasets.XQUAD_R, "xquad-r"),
    _spec("mlqa_r", datasets.MLQA_R, "mlqa-r"),
)
