"""Tatoeba bitext retrieval (LASER's test set, as in XTREME): accuracy of xx->en and en->xx nearest neighbours.

For a language xx the folder holds `tatoeba.{xx}-eng.{xx}` and `tatoeba.{xx}-eng.eng`, aligned line by line
(xx uses the set's three-letter codes: deu, cmn, ...). Each side is encoded (as queries by default, since
bitext mining is symmetric; `encode_as` picks passages instead), embeddings are L2-normalised (cosine
similarity, the standard for this task whatever the model's own scoring), and a sentence counts as correct when
its nearest neighbour on the other side is its own translation (ties broken by line index). The summary is the
mean accuracy over languages for each direction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from mlret import storage
from mlret.data import datasets
from mlret.eval.base import Embedder, EvalContext, EvalResult, EvaluatorSpec, PerQuery, embed, macro_mean, parse_list
from mlret.eval.retrieval import ExactIndex

log = logging.getLogger(__name__)



def read_pair(data_dir: str, lang: str, max_sentences: int = 0) -> tuple[list[str], list[str]]:
    """The aligned (xx, eng) sentence lists of one language."""
    paths = [os.path.join(data_dir, f"tatoeba.{lang}-eng.{side}") for side in (lang, "eng")]
    sides = []
    for p in paths:
        if not storage.path(p).exists():
            raise FileNotFoundError(f"{p}: missing; check config.eval.tatoeba.data_dir and languages "
                                    "(three-letter codes such as deu, cmn)")
        with storage.path(p).open("r", encoding="utf-8") as f:
            sides.append([line.rstrip("\n") for line in f])
    if len(sides[0]) != len(sides[1]):
        raise ValueError(f"{paths[0]} has {len(sides[0])} lines but {paths[1]} has {len(sides[1])}")
    if max_sentences:
        sides = [s[:max_sentences] for s in sides]
    return sides[0], sides[1]


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def bitext_hits(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """Per row i: 1.0 when its nearest target (cosine, ties by index) is row i, else 0.0."""
    top = ExactIndex(_normalize(tgt)).search(_normalize(src), 1).indices[:, 0]
    return (top == np.arange(len(src))).astype(np.float64)



class TatoebaEvaluator:
    """xx->en and en->xx accuracy over the configured languages."""

    def __init__(self, name: str, data_dir: str, languages: Sequence[str] = datasets.TATOEBA.languages, *,
                 max_sentences: int = 0, encode_as: str = "query"):
        self.name = name
        self.data_dir = data_dir
        self.languages = list(languages)
        self.max_sentences = max_sentences
        self.encode_as = encode_as

    def run(self, embedder: Embedder, output_dir: str | None = None) -> EvalResult:
        """Summary xx2en, en2xx and their mean `acc`; per query: setting "pairs", one row per sentence pair (id:
        its line number) with the hits of both directions."""
        fn = embedder.queries if self.encode_as == "query" else embedder.passages
        pairs = {lang: read_pair(self.data_dir, lang, self.max_sentences) for lang in self.languages}
        texts = [t for xx, en in pairs.values() for t in xx + en]
        log.info("%s: encoding %d sentences (%d languages)", self.name, len(texts), len(pairs))
        emb = embed(fn, texts, f"{self.name} sentences")
        per_lang: dict[str, dict[str, float]] = {}
        rows = []
        o = 0
        for lang, (xx, _) in pairs.items():
            e_xx, e_en = emb[o:o + len(xx)], emb[o + len(xx):o + 2 * len(xx)]
            o += 2 * len(xx)
            hits = {"xx2en": bitext_hits(e_xx, e_en), "en2xx": bitext_hits(e_en, e_xx)}
            rows.append(PerQuery([str(i) for i in range(len(xx))], [lang] * len(xx), hits))
            per_lang[lang] = {k: float(np.mean(v)) for k, v in hits.items()} | {"sentences": len(xx)}
        summary = {k: macro_mean({x: m[k] for x, m in per_lang.items()}) for k in ("xx2en", "en2xx")}
        summary["acc"] = (summary["xx2en"] + summary["en2xx"]) / 2
        return EvalResult(summary=summary, details={
            "languages": per_lang,
            "options": {"data_dir": self.data_dir, "max_sentences": self.max_sentences, "encode_as": self.encode_as}},
            per_query={"pairs": PerQuery.concat(rows)})


# ------------------------------------------------------------------------------------------------ registry

def _defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.data_dir = ""  # "": <data.data_dir>/tatoeba/v1
    s.languages = ",".join(datasets.TATOEBA.languages)  # Tatoeba's three-letter codes
    s.max_sentences = 0  # >0: first sentences per language (fast subset)
    s.encode_as = "query"  # query | passage
    return s


def _validate(sec: ml_collections.ConfigDict, ctx: EvalContext) -> None:
    if sec.encode_as not in ("query", "passage"):
        raise ctx.fail("encode_as", f"{sec.encode_as!r} is not query or passage")


def _build(sec: ml_collections.ConfigDict, ctx: EvalContext) -> TatoebaEvaluator:
    return TatoebaEvaluator(ctx.name, ctx.data_dir, parse_list(sec.languages), max_sentences=sec.max_sentences,
                            encode_as=sec.encode_as)


def _files(ev: TatoebaEvaluator) -> list[str]:
    return [os.path.join(ev.data_dir, f"tatoeba.{lang}-eng.{side}") for lang in ev.languages for side in (lang, "eng")]


EVALUATORS = (EvaluatorSpec("tatoeba", _defaults, _build, _validate, _files, data_subdir=os.path.join("tatoeba", "v1"),
                            origin=datasets.TATOEBA.origin,
                            protocol="Tatoeba bitext retrieval: accuracy of finding the translation, xx->en and "
                                     "en->xx, macro-averaged over languages."),)
