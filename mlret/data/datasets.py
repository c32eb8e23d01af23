"""The public datasets mlret reads, each described once: its languages and where its public copy comes from.

Training-source kinds (`mlret.data.kinds`), evaluators (`mlret.eval`) and the pre-flight's messages
(`mlret.preflight`) all take a dataset's language table and origin from here. Codes are ISO 639-1
(`mlret.data.LANGUAGES`) except Tatoeba's three-letter codes; `names` maps a code to the dataset's own name for
the language where the files use one (TyDi QA ids and records, Mr. TyDi archives, mMARCO file names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Dataset:
    languages: tuple[str, ...]
    origin: str  # what the files are (licence) and where the public copy comes from
    names: Mapping[str, str] = dataclasses.field(default_factory=dict)  # code -> the dataset's name for it

    @property
    def codes_by_name(self) -> dict[str, str]:
        return {name: code for code, name in self.names.items()}


_TYDI_NAMES = {"ar": "arabic", "bn": "bengali", "en": "english", "fi": "finnish", "id": "indonesian",
               "ja": "japanese", "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu", "th": "thai"}
_MLQA_LANGUAGES = ("ar", "de", "en", "es", "hi", "vi", "zh")

XQUAD_R = Dataset(("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh"),
                  "XQuAD-R (LAReQA; CC BY-SA 4.0), https://github.com/google-research-datasets/lareqa/tree/master/"
                  "xquad-r")
MLQA_R = Dataset(_MLQA_LANGUAGES, "MLQA-R (LAReQA: MLQA dev with sentence breaks; CC BY-NC 4.0, research only), "
                 "https://github.com/google-research-datasets/lareqa/tree/354d67d1cd066854cdfbf5ad0e6105528976141d/"
                 "mlqa-r (removed upstream after that commit)")
MLQA = Dataset(_MLQA_LANGUAGES, "MLQA, https://github.com/facebookresearch/MLQA")
# SQuAD v1.1 (en) and XTREME's translate-train targets.
SQUAD_TRANSLATE = Dataset(("en", "ar", "de", "el", "es", "hi", "ru", "th", "tr", "vi", "zh"),
                          "SQuAD v1.1 + XTREME translate-train, https://github.com/google-research/xtreme")
MMARCO = Dataset(("ar", "de", "en", "es", "fr", "hi", "id", "it", "ja", "nl", "pt", "ru", "vi", "zh"),
                 "mMARCO, https://huggingface.co/datasets/unicamp-dl/mmarco",
                 {"ar": "arabic", "de": "german", "en": "english", "es": "spanish", "fr": "french", "hi": "hindi",
                  "id": "indonesian", "it": "italian", "ja": "japanese", "nl": "dutch", "pt": "portuguese",
                  "ru": "russian", "vi": "vietnamese", "zh": "chinese"})
MIRACL = Dataset(("ar", "bn", "de", "en", "es", "fa", "fi", "fr", "hi", "id", "ja", "ko", "ru", "sw", "te", "th",
                  "yo", "zh"),
                 "MIRACL v1.0 topics / qrels, https://huggingface.co/datasets/miracl/miracl (corpus: "
                 "https://huggingface.co/datasets/miracl/miracl-corpus)")
# MIRACL's two surprise languages, released after the 16 "known" ones (Zhang et al. 2023, table 1).
MIRACL_SURPRISE_LANGUAGES = ("de", "yo")
# TyDi QA names languages in full (GoldP ids start with the name, primary-task records carry it).
TYDIQA = Dataset(tuple(_TYDI_NAMES), "TyDi QA primary task, https://github.com/google-research-datasets/tydiqa",
                 _TYDI_NAMES)
TYDIQA_GOLDP = Dataset(tuple(_TYDI_NAMES), "TyDi QA GoldP, https://github.com/google-research-datasets/tydiqa",
                       _TYDI_NAMES)
MRTYDI = Dataset(tuple(_TYDI_NAMES), "Mr. TyDi v1.1, https://github.com/castorini/mr.tydi", _TYDI_NAMES)
# The XQuAD-R languages other than English, in Tatoeba's codes: the Tatoeba evaluator's default.
TATOEBA = Dataset(("ara", "deu", "ell", "spa", "hin", "rus", "tha", "tur", "vie", "cmn"),
                  "the LASER Tatoeba test set (CC BY 2.0 FR), "
                  "https://github.com/facebookresearch/LASER/tree/main/data/tatoeba/v1")
