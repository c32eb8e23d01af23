"""Held-out splits and evaluation slices of the LAReQA sets, by article (the offline study, issue 31).

* MLQA-R dev split. MLQA-R is the study's training data (an offline stand-in), so choosing a learning rate or a
  temperature on it needs questions that are never trained on. Its language files do not share article titles
  (each language has its own Wikipedia article), but they share question ids: the articles of all languages
  that hold one question id describe the same source article. `mlqa_r_groups` joins them into article groups
  (connected components of (language, article) linked by question ids), and `mlqa_r_split` draws whole groups,
  seeded, into the dev split; training drops every unit whose question id is in it (`filter_sources`), and the
  dev evaluation (`LareqaSubset`) keeps only the dev articles' paragraphs: their questions and, as candidates,
  every sentence of those paragraphs.
* XQuAD-R stratified slice. A slice made of the first paragraphs of each file is ten of the 48 articles;
  `stratified_paragraphs` draws paragraphs at random within every article instead (every article gets
  `n // 48` paragraphs or one more, the extra ones on randomly chosen articles), seeded, so that every run is
  evaluated on the same draw at the same cost. XQuAD is parallel: article and paragraph indices are the same in
  every language, so one draw serves all eleven.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mlret.data.readers import read_lareqa
from mlret.errors import DataError
from mlret.eval.lareqa import LareqaEvaluator, LareqaLanguage, load

Paragraph = tuple[int, int]  # (article index, paragraph index within the article), as read_lareqa numbers them


def _raise(where: str, why: str, *, file: str | None = None) -> None:
    raise DataError(f"{file or ''}: {where}: {why}")


def paragraph_questions(path: str) -> dict[Paragraph, list[str]]:
    """(article, paragraph) -> its question ids, for one LAReQA language file."""
    return {(p.article, p.index): [q.id for q in p.questions] for p in read_lareqa(path, _raise)}


@dataclasses.dataclass(frozen=True)
class ArticleGroup:
    """One source article of MLQA-R: its (language, article index) members and their question ids."""

    members: frozenset[tuple[str, int]]
    question_ids: frozenset[str]


def mlqa_r_groups(data_dir: str, languages: Sequence[str]) -> list[ArticleGroup]:
    """The article groups of MLQA-R (module docstring), sorted by their smallest question id (a stable order)."""
    parent: dict[Any, Any] = {}

    def find(x: Any) -> Any:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for lang in languages:
        for (article, _), ids in paragraph_questions(os.path.join(data_dir, f"{lang}.json")).items():
            node = ("a", lang, article)
            find(node)
            for q in ids:
                parent[find(("q", q))] = find(node)
    groups: dict[Any, tuple[set, set]] = {}
    for node in list(parent):
        members, ids = groups.setdefault(find(node), (set(), set()))
        (members.add((node[1], node[2])) if node[0] == "a" else ids.add(node[1]))
    out = [ArticleGroup(frozenset(m), frozenset(q)) for m, q in groups.values() if q]
    return sorted(out, key=lambda g: min(g.question_ids))


@dataclasses.dataclass(frozen=True)
class Split:
    """The dev side of a split: its question ids and, per language, its article indices."""

    question_ids: frozenset[str]
    articles: dict[str, frozenset[int]]
    groups: int

    def paragraphs(self, data_dir: str, languages: Sequence[str]) -> dict[str, set[Paragraph]]:
        """Per language, the (article, paragraph) keys of the dev articles."""
        return {lang: {p for p in paragraph_questions(os.path.join(data_dir, f"{lang}.json"))
                       if p[0] in self.articles.get(lang, ())} for lang in languages}


def mlqa_r_split(data_dir: str, languages: Sequence[str], dev_questions: int, seed: int) -> Split:
    """Whole article groups, in a seeded random order, into the dev split until it holds at least
    `dev_questions` English questions (every MLQA-R question exists in English). Deterministic for a seed."""
    groups = mlqa_r_groups(data_dir, languages)
    order = np.random.default_rng(seed).permutation(len(groups))
    en = set(paragraph_qids(os.path.join(data_dir, "en.json"))) if "en" in languages else None
    chosen: list[ArticleGroup] = []
    count = 0
    for i in order:
        if count >= dev_questions:
            break
        chosen.append(groups[i])
        count += len(groups[i].question_ids & en) if en is not None else len(groups[i].question_ids)
    articles: dict[str, set[int]] = {}
    for g in chosen:
        for lang, article in g.members:
            articles.setdefault(lang, set()).add(article)
    return Split(frozenset(q for g in chosen for q in g.question_ids),
                 {k: frozenset(v) for k, v in articles.items()}, len(chosen))


def paragraph_qids(path: str) -> list[str]:
    return [q for ids in paragraph_questions(path).values() for q in ids]


def stratified_paragraphs(data_dir: str, n: int, seed: int, lang: str = "en") -> set[Paragraph]:
    """`n` paragraphs of a parallel LAReQA set (XQuAD-R), stratified by article (module docstring)."""
    by_article: dict[int, list[int]] = {}
    for article, index in sorted(paragraph_questions(os.path.join(data_dir, f"{lang}.json"))):
        by_article.setdefault(article, []).append(index)
    articles = sorted(by_article)
    if not 0 < n <= sum(len(v) for v in by_article.values()):
        raise ValueError(f"stratified_paragraphs: n = {n} is not in 1..{sum(len(v) for v in by_article.values())}")
    rng = np.random.default_rng(seed)
    share = {a: n // len(articles) for a in articles}
    for a in rng.permutation(articles)[: n % len(articles)]:
        share[int(a)] += 1
    out: set[Paragraph] = set()
    for a in articles:
        k = min(share[a], len(by_article[a]))
        out |= {(a, int(i)) for i in rng.choice(by_article[a], size=k, replace=False)}
    return out


def subset_language(lang: Any, keep: set[Paragraph]) -> Any:
    """A LareqaLanguage (mlret.eval.lareqa) holding only the paragraphs `keep`: their sentences as candidates and
    their questions, the gold indices renumbered."""
    kept = [i for i, (a, p, _) in enumerate(lang.keys) if (a, p) in keep]
    new_index = {old: new for new, old in enumerate(kept)}
    q_keep = [j for j, g in enumerate(lang.gold.tolist()) if g in new_index]
    return LareqaLanguage(lang.lang, lang.path, [lang.sentences[i] for i in kept],
                          [lang.paragraphs[i] for i in kept], [lang.keys[i] for i in kept],
                          [lang.question_ids[j] for j in q_keep], [lang.questions[j] for j in q_keep],
                          np.asarray([new_index[int(lang.gold[j])] for j in q_keep], dtype=np.int64))


def lareqa_subset(name: str, data_dir: str, languages: Sequence[str], keep: dict[str, set[Paragraph]],
                  **options: Any) -> Any:
    """A LAReQA evaluator (mlret.eval.lareqa.LareqaEvaluator) over the paragraphs `keep` of each language only,
    reported under `name`; `options` are the evaluator's (settings, candidate_context, ...)."""
    class LareqaSubset(LareqaEvaluator):
        @property
        def langs(self):  # noqa: ANN202 - the parent's property
            if self._langs is None:
                full = load(self.data_dir, self.languages)
                self._langs = {x: subset_language(full[x], keep.get(x, set())) for x in self.languages}
            return self._langs

    return LareqaSubset(name, data_dir, languages, **options)


def filter_sources(sources: Iterable[tuple[str, Any]], drop_ids: frozenset[str]) -> list[tuple[str, Any]]:
    """Prepared training sources (mlret.data.pipeline.Sources) without the units whose id is in `drop_ids`."""
    out = []
    for name, store in sources:
        keep = [i for start in range(0, len(store), 1024)
                for i, u in zip(range(start, min(start + 1024, len(store))),
                                store.get(range(start, min(start + 1024, len(store)))))
                if u.id not in drop_ids]
        out.append((name, FilteredStore(store, keep)))
    return out


class FilteredStore:
    """A unit store (mlret.data.pipeline.UnitStore) showing only the units at `indices` of another."""

    def __init__(self, store: Any, indices: Sequence[int]) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, indices: Sequence[int]) -> list[Any]:
        return self.store.get([int(self.indices[i]) for i in indices])
