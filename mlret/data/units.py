"""Parallel units: the training record of mlret, the language table, and bad-record handling.

A parallel unit is one semantic QA item available in one or more languages (docs/architecture.md, Data):

    {"id": "q123", "source": "mlqa", "texts": {
        "de": {"query": "...", "positive": "...", "negatives": ["...", ...]},
        "en": {"query": "...", "positive": "...", "negatives": [...], "scores": [9.1, 7.3, ...]}}}

`scores` (optional, per language) are a teacher's scores of the positive and of each negative, in that order
(1 + len(negatives) finite numbers; `python -m mlret.mine --teacher MODEL` writes them): the batch's
`teacher_scores` field, which the distillation losses read (`mlret.losses.distill`).

Every reader in `mlret.data.readers` produces `ParallelUnit`s; the TFDS builders store them; the hybrid
schedule draws pairs from them. Languages are ISO 639-1 codes from the fixed tuple `LANGUAGES`, whose index is
what travels in a batch (`query_lang`, `passage_lang`).

Bad input is never dropped silently: `BadRecords` either raises `DataError` naming the file and line (or the
JSON path inside a SQuAD-style file) or, with `config.data.on_bad_record="skip"`, counts and logs the skip.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from mlret.errors import DataError

log = logging.getLogger(__name__)

# ISO 639-1 codes. The index of a code is what a batch carries in `query_lang` / `passage_lang`, so this tuple
# is APPEND-ONLY: reordering it would silently relabel the languages of saved batches and metrics.
LANGUAGES: tuple[str, ...] = (
    "af", "am", "ar", "az", "be", "bg", "bn", "bs", "ca", "cs", "cy", "da", "de", "el", "en", "eo", "es", "et",
    "eu", "fa", "fi", "fr", "ga", "gl", "gu", "ha", "he", "hi", "hr", "hu", "hy", "id", "ig", "is", "it", "ja",
    "jv", "ka", "kk", "km", "kn", "ko", "ku", "ky", "la", "lo", "lt", "lv", "mg", "mk", "ml", "mn", "mr", "ms",
    "my", "ne", "nl", "no", "or", "pa", "pl", "ps", "pt", "ro", "ru", "sa", "sd", "si", "sk", "sl", "so", "sq",
    "sr", "su", "sv", "sw", "ta", "te", "th", "tl", "tr", "ug", "uk", "ur", "uz", "vi", "xh", "yi", "yo", "zh",
    "zu",
)
LANG_INDEX: dict[str, int] = {code: i for i, code in enumerate(LANGUAGES)}

MONOLINGUAL = 0  # batch_type of an X-X-mono global batch
CROSS_LINGUAL = 1  # batch_type of an X-Y global batch


def lang_index(code: str) -> int:
    """Index of an ISO 639-1 code in LANGUAGES; raises KeyError with the known codes when it is not there."""
    try:
        return LANG_INDEX[code]
    except KeyError:
        raise KeyError(f"unknown language code {code!r}: mlret.data.LANGUAGES holds ISO 639-1 codes "
                       f"({', '.join(LANGUAGES)}); append a new code at the end of the tuple") from None


@dataclasses.dataclass(frozen=True)
class LangText:
    """A unit's texts in one language: the query, its positive passage and (optional) hard negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()  # a teacher's scores of (positive, *negatives); () when none


@dataclasses.dataclass(frozen=True)
class ParallelUnit:
    """One QA item in one or more languages. `texts` maps an ISO code (in LANGUAGES) to its LangText."""

    id: str
    source: str
    texts: Mapping[str, LangText]

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(sorted(self.texts))

    def to_json(self) -> dict[str, Any]:
        """The JSON form of the unit (what a user JSONL line holds; the module docstring)."""
        return {"id": self.id, "source": self.source, "texts": {
            lang: {"query": t.query, "positive": t.positive, "negatives": list(t.negatives),
                   **({"scores": list(t.scores)} if t.scores else {})}
            for lang, t in sorted(self.texts.items())}}


def check_unit(unit: ParallelUnit) -> str | None:
    """Why `unit` breaks the contract (None when it is fine): empty id, no language, an unknown language code,
    an empty query, positive or negative."""
    if not unit.id:
        return "empty unit id"
    if not unit.texts:
        return f"unit {unit.id!r} has no language"
    for lang, t in unit.texts.items():
        if lang not in LANG_INDEX:
            return (f"unit {unit.id!r}: unknown language code {lang!r} (mlret.data.LANGUAGES holds ISO 639-1 "
                    "codes such as 'de', 'zh')")
        if not isinstance(t.query, str) or not t.query.strip():
            return f"unit {unit.id!r}, language {lang}: empty query"
        if not isinstance(t.positive, str) or not t.positive.strip():
            return f"unit {unit.id!r}, language {lang}: empty positive passage"
        for j, neg in enumerate(t.negatives):
            if not isinstance(neg, str) or not neg.strip():
                return f"unit {unit.id!r}, language {lang}: negative {j} is empty or not a string"
        if t.scores and len(t.scores) != 1 + len(t.negatives):
            return (f"unit {unit.id!r}, language {lang}: {len(t.scores)} scores for the positive and "
                    f"{len(t.negatives)} negative(s); give 1 + {len(t.negatives)} (positive first), or none")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in t.scores):
            return f"unit {unit.id!r}, language {lang}: scores must be finite numbers"
    return None


def unit_from_json(obj: Any, *, default_source: str = "jsonl") -> ParallelUnit:
    """Parse one unit JSON object (the module docstring) into a ParallelUnit; raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"a unit is a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "source", "texts"}
    if unknown:
        raise ValueError(f"unknown unit field(s) {sorted(unknown)}; a unit has id, source, texts")
    if "id" not in obj or "texts" not in obj:
        raise ValueError("a unit needs 'id' and 'texts'")
    texts = obj["texts"]
    if not isinstance(texts, dict):
        raise ValueError("'texts' must map language codes to {query, positive, negatives}")
    out: dict[str, LangText] = {}
    for lang, t in texts.items():
        if not isinstance(t, dict):
            raise ValueError(f"texts[{lang!r}] must be an object with query, positive, negatives")
        extra = set(t) - {"query", "positive", "negatives", "scores"}
        if extra:
            raise ValueError(f"texts[{lang!r}] has unknown field(s) {sorted(extra)}")
        negatives = t.get("negatives", [])
        if not isinstance(negatives, list):
            raise ValueError(f"texts[{lang!r}].negatives must be a list of strings")
        scores = t.get("scores", [])
        if not isinstance(scores, list):
            raise ValueError(f"texts[{lang!r}].scores must be a list of numbers (positive first, then each negative)")
        out[lang] = LangText(query=t.get("query", ""), positive=t.get("positive", ""), negatives=tuple(negatives),
                             scores=tuple(scores))
    unit = ParallelUnit(id=str(obj["id"]), source=str(obj.get("source", default_source)), texts=out)
    why = check_unit(unit)
    if why:
        raise ValueError(why)
    return unit


class BadRecords:
    """What to do with a record that cannot become (part of) a unit: raise or count-and-log.

    `policy="error"` raises DataError("<where>: <why>") at the first bad record; `policy="skip"` logs a
    warning per record (the first `log_first` in full, then a summary) and keeps counts per file in `.counts`.
    """

    def __init__(self, policy: str = "error", *, log_first: int = 20) -> None:
        if policy not in ("error", "skip"):
            raise ValueError(f"on_bad_record={policy!r} is not error or skip (config.data.on_bad_record)")
        self.policy = policy
        self.log_first = log_first
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, where: str, why: str, *, file: str | None = None) -> None:
        """Report a bad record at `where` ("path:line" or "path: data[3].paragraphs[1]...")."""
        if self.policy == "error":
            raise DataError(f"{where}: {why} (set config.data.on_bad_record='skip' to count and skip such records)")
        key = file if file is not None else where.split(":", 1)[0]
        self.counts[key] += 1
        if self.total <= self.log_first:
            log.warning("skipping bad record at %s: %s", where, why)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{path}: {n}" for path, n in sorted(self.counts.items())) or "none"

    def log_summary(self, what: str) -> None:
        if self.total:
            log.warning("%s: skipped %d bad record(s) (on_bad_record=skip): %s", what, self.total, self.summary())


def as_bad_records(on_bad: BadRecords | str) -> BadRecords:
    return on_bad if isinstance(on_bad, BadRecords) else BadRecords(on_bad)


def dedupe_keep_order(items: Iterable[str]) -> tuple[str, ...]:
    """Drop repeated strings, keeping first occurrences (negatives that repeat add nothing to a batch)."""
    seen: set[str] = set()
    out = []
    for s in items:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return tuple(out)


def dumps_unit(unit: ParallelUnit) -> str:
    return json.dumps(unit.to_json(), ensure_ascii=False)
