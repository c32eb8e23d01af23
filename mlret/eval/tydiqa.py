"""TyDi QA passage retrieval: find the gold passage among the passage candidates (MRR@k and accuracy@1).

Input is the TyDi QA primary-task jsonl(.gz) (`question_text`, `document_plaintext`, `passage_answer_candidates`
with UTF-8 *byte* offsets into the plaintext, and `annotations` with `passage_answer.candidate_index`). A
candidate is gold when any annotator selected it; examples where no annotator selected a passage (the question
has no answer in the article) cannot be scored by retrieval and are skipped and counted, as are examples with
fewer votes than `min_votes`.

Pool (`candidates`): "article" ranks the passages of the question's own article (the primary task's passage
selection, seen as retrieval); "language" ranks every passage of every example of that language. Accuracy@1 is
the exact match of the top passage with a gold one. Metrics are means per language, then over languages.

Candidates are deduplicated by text within the pool: an article shared by several examples (or a passage repeated
within an article) would otherwise put identical passages beside the gold, tying with it and pushing it down by
the tie rule. A gold passage counts as its text's one kept copy.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from mlret.data import datasets
from mlret.errors import DataError
from mlret.eval import metrics as M
from mlret.eval.base import Embedder, EvalContext, EvalResult, EvaluatorSpec, PerQuery, embed, macro_mean, parse_list
from mlret.eval.retrieval import RetrievalOptions, describe_search, full_ranks, index_ranks, search_summary

log = logging.getLogger(__name__)



def read_examples(path: str, languages: Sequence[str] = (), max_examples: int = 0,
                  min_votes: int = 1) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Examples with at least `min_votes` passage annotations: {lang, question, passages, gold (set)}; and the
    counts of skipped examples by reason."""
    opener = gzip.open if path.endswith(".gz") else open
    out: list[dict[str, Any]] = []
    skipped = {"no_gold_passage": 0, "other_language": 0}
    per_lang: dict[str, int] = {}
    try:
        f = opener(path, "rt", encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; set config.eval.tydiqa.path to a TyDi QA primary-task "
                                "jsonl(.gz)") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                lang = datasets.TYDIQA.codes_by_name.get(rec["language"], rec["language"])
                doc = rec["document_plaintext"].encode("utf-8")
                cands = rec["passage_answer_candidates"]
                votes = [a["passage_answer"]["candidate_index"] for a in rec["annotations"]]
                question = rec["question_text"]
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}:{n}: not a TyDi QA primary-task record ({e!r})") from None
            if languages and lang not in languages:
                skipped["other_language"] += 1
                continue
            gold_votes = [v for v in votes if v >= 0]
            if len(gold_votes) < min_votes:
                skipped["no_gold_passage"] += 1
                continue
            if max_examples and per_lang.get(lang, 0) >= max_examples:
                continue
            passages = []
            for c in cands:
                start, end = c["plaintext_start_byte"], c["plaintext_end_byte"]
                if not 0 <= start <= end <= len(doc):
                    raise DataError(f"{path}:{n}: candidate bytes [{start}, {end}) outside the "
                                        f"{len(doc)}-byte document")
                passages.append(doc[start:end].decode("utf-8", errors="replace").strip())
            bad = [v for v in gold_votes if v >= len(passages)]
            if bad:
                raise DataError(f"{path}:{n}: annotated candidate_index {bad[0]} but only {len(passages)} "
                                    "candidates")
            out.append({"id": str(rec.get("example_id", n)), "lang": lang, "question": question,
                        "passages": passages, "gold": sorted(set(gold_votes))})
            per_lang[lang] = per_lang.get(lang, 0) + 1
    return out, skipped


def unique_texts(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(kept, copy): the index of the first occurrence of each distinct text, in order, and for every text the
    position in `kept` of its copy, so that `texts[kept[copy[i]]] == texts[i]`."""
    first: dict[str, int] = {}
    copy = np.array([first.setdefault(t, len(first)) for t in texts], dtype=np.int64)
    kept = np.full(len(first), -1, dtype=np.int64)
    kept[copy[::-1]] = np.arange(len(texts))[::-1]  # the smallest index of each group wins
    return kept, copy


class TydiQAEvaluator:
    """Gold-passage retrieval on TyDi QA primary-task data (see the module docstring)."""

    def __init__(self, name: str, path: str, *, languages: Sequence[str] = (), candidates: str = "article",
                 mrr_k: int = 10, max_examples: int = 0, min_votes: int = 1,
                 retrieval: RetrievalOptions | None = None):
        self.name = name
        self.path = path
        self.languages = list(languages)
        self.candidates = candidates
        self.mrr_k = mrr_k
        self.max_examples = max_examples
        self.min_votes = min_votes
        self.retrieval = retrieval

    def run(self, embedder: Embedder, output_dir: str | None = None) -> EvalResult:
        """Summary: mrr and acc1, macro means over languages; per query: setting "questions", one row per scored
        example (id: its example_id)."""
        examples, skipped = read_examples(self.path, self.languages, self.max_examples, self.min_votes)
        if not examples:
            raise ValueError(f"{self.path}: no example with a gold passage (languages {self.languages or 'all'})")
        passages = [p for ex in examples for p in ex["passages"]]
        log.info("%s: encoding %d questions and %d passages", self.name, len(examples), len(passages))
        q = embed(embedder.queries, [ex["question"] for ex in examples], f"{self.name} questions")
        p = embed(embedder.passages, passages, f"{self.name} passages")
        starts = np.cumsum([0] + [len(ex["passages"]) for ex in examples])
        ranks = np.full((len(examples), max(len(ex["gold"]) for ex in examples)), np.inf)
        if self.candidates == "article":
            groups = [[i] for i in range(len(examples))]
        else:
            groups = [[i for i, ex in enumerate(examples) if ex["lang"] == lang]
                      for lang in sorted({ex["lang"] for ex in examples})]
        pool = np.zeros(len(examples), dtype=np.int64)  # distinct candidates each example is ranked among
        search: dict[str, list] = {}
        # The language pool can rank through the index (config.eval.retrieval.rank_with_index); articles are small.
        through_index = self.candidates == "language" and self.retrieval is not None and self.retrieval.rank_with_index
        rank = index_ranks(self.retrieval, self.name, search) if through_index else full_ranks
        for idx in groups:
            cols = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])
            kept, copy = unique_texts([passages[c] for c in cols])
            local = np.cumsum([0] + [len(examples[i]["passages"]) for i in idx])
            rel = [sorted({int(copy[local[j] + g]) for g in examples[i]["gold"]}) for j, i in enumerate(idx)]
            r = rank(q[idx], p[cols[kept]], rel, [examples[idx[0]]["lang"]] * len(kept))
            ranks[idx, : r.shape[1]] = r
            pool[idx] = len(kept)
        mrr = M.reciprocal_rank(ranks, k=self.mrr_k or None)
        acc1 = M.hit_at_k(ranks, 1)
        per_lang: dict[str, dict[str, float]] = {}
        for lang in sorted({ex["lang"] for ex in examples}):
            sel = np.array([ex["lang"] == lang for ex in examples])
            per_lang[lang] = {"mrr": float(mrr[sel].mean()), "acc1": float(acc1[sel].mean()),
                              "examples": int(sel.sum()),
                              "mean_candidates": float(pool[sel].mean())}
        summary = {"mrr": macro_mean({x: m["mrr"] for x, m in per_lang.items()}),
                   "acc1": macro_mean({x: m["acc1"] for x, m in per_lang.items()})}
        summary.update(search_summary(search.get(self.name, [])))
        questions = PerQuery([ex["id"] for ex in examples], [ex["lang"] for ex in examples],
                             {"mrr": np.asarray(mrr, np.float64), "acc1": np.asarray(acc1, np.float64)})
        return EvalResult(summary=summary, details={
            "languages": per_lang, "skipped": skipped, "search": search.get(self.name, []),
            **({"index": describe_search(search[self.name])} if search.get(self.name) else {}),
            "options": {"path": self.path, "candidates": self.candidates, "mrr_k": self.mrr_k,
                        "max_examples": self.max_examples, "min_votes": self.min_votes}},
            per_query={"questions": questions})


# ------------------------------------------------------------------------------------------------ registry

def _defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.path = ""  # TyDi QA primary-task jsonl(.gz) (e.g. tydiqa-v1.0-dev.jsonl.gz)
    s.languages = ""  # ISO codes (ar, bn, ...); "": all
    s.candidates = "article"  # article: the question's own passages | language: all of the language's
    s.mrr_k = 10
    s.max_examples = 0  # >0: per language (fast subset)
    s.min_votes = 1  # annotators that must pick a passage for the example to count
    return s


def _validate(sec: ml_collections.ConfigDict, ctx: EvalContext) -> None:
    if sec.candidates not in ("article", "language"):
        raise ctx.fail("candidates", f"{sec.candidates!r} is not article or language")
    if ctx.active and not sec.path:
        raise ctx.fail("path", "empty; name a TyDi QA primary-task jsonl(.gz)")
    unknown = [x for x in parse_list(sec.languages) if x not in datasets.TYDIQA.languages]
    if unknown:
        raise ctx.fail("languages", f"{unknown} are not TyDi QA languages ({','.join(datasets.TYDIQA.languages)})")


def _build(sec: ml_collections.ConfigDict, ctx: EvalContext) -> TydiQAEvaluator:
    return TydiQAEvaluator(ctx.name, sec.path, languages=parse_list(sec.languages), candidates=sec.candidates,
                           mrr_k=sec.mrr_k, max_examples=sec.max_examples, min_votes=sec.min_votes,
                           retrieval=RetrievalOptions.from_config(ctx.config.eval.retrieval))


EVALUATORS = (EvaluatorSpec("tydiqa", _defaults, _build, _validate, files=lambda ev: [ev.path], files_field="path",
                            origin=datasets.TYDIQA.origin,
                            protocol="TyDi QA passage selection: MRR and accuracy@1 of the annotated passage."),)
