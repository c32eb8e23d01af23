"""Synthetic unit stores at the paper config's pool sizes, for benchmarks/data_pipeline.py --pool-scale.

The paper config (configs/paper.py) trains on SQuAD translate-train (88k units in 11 languages, the other
sentences of the paragraph as hard negatives), mMARCO (400k units in 14 languages, one BM25 negative) and
Mr. TyDi train (monolingual units in 11 languages, no negatives: every pair takes its hard negative from the
fill). The stores here have those shapes and sizes; their texts are real MLQA-R questions and sentences (an
mMARCO passage is two sentences, about its real length), tagged with the unit number so that every positive is
distinct, and generated on demand (`get`) so that a million units cost no memory. What they leave out is the
ArrayRecord read itself (measured on the real MLQA-R store by the main table).
"""

from __future__ import annotations

from collections.abc import Sequence

from mlret.data.units import LangText, ParallelUnit

SQUAD_LANGS = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
MMARCO_LANGS = ("ar", "de", "en", "es", "fr", "hi", "id", "it", "ja", "nl", "pt", "ru", "vi", "zh")
MRTYDI_LANGS = ("ar", "bn", "en", "fi", "id", "ja", "ko", "ru", "sw", "te", "th")


class SyntheticStore:
    """`n` units of `kind` (squad | mmarco | mrtydi) built on demand from a bank of real texts."""

    def __init__(self, kind: str, n: int, questions: Sequence[str], sentences: Sequence[str]) -> None:
        if kind not in ("squad", "mmarco", "mrtydi"):
            raise ValueError(f"SyntheticStore: kind {kind!r} is not squad, mmarco or mrtydi")
        self.kind, self.n = kind, int(n)
        self.questions, self.sentences = list(questions), list(sentences)

    def __len__(self) -> int:
        return self.n

    def _sentence(self, k: int) -> str:
        return self.sentences[k % len(self.sentences)]

    def _text(self, i: int, lang: str, j: int) -> LangText:
        tag = f"[{self.kind} {i} {lang}]"
        q = f"{self.questions[(7 * i + j) % len(self.questions)]} {tag}"
        base = 13 * i + 5 * j
        if self.kind == "squad":  # an answer sentence; the paragraph's other sentences as negatives
            return LangText(q, f"{self._sentence(base)} {tag}",
                            tuple(f"{self._sentence(base + d)} {tag}" for d in range(1, 5)))
        if self.kind == "mmarco":  # a passage of two sentences, one BM25 negative
            return LangText(q, f"{self._sentence(base)} {self._sentence(base + 1)} {tag}",
                            (f"{self._sentence(base + 2)} {self._sentence(base + 3)} {tag} n",))
        return LangText(q, f"{self._sentence(base)} {self._sentence(base + 1)} {tag}")  # mrtydi: no negatives

    def unit(self, i: int) -> ParallelUnit:
        if self.kind == "mrtydi":
            langs = (MRTYDI_LANGS[i % len(MRTYDI_LANGS)],)
        else:
            langs = SQUAD_LANGS if self.kind == "squad" else MMARCO_LANGS
        return ParallelUnit(f"{self.kind}-{i}", self.kind, {lang: self._text(i, lang, j) for j, lang in
                                                            enumerate(langs)})

    def get(self, indices: Sequence[int]) -> list[ParallelUnit]:
        return [self.unit(int(i)) for i in indices]
