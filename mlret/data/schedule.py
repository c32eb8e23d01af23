"""The hybrid batch schedule (arXiv 2408.10536) as pure functions of (seed, step, data).

At step t a PRNG keyed by (seed, t) (`np.random.default_rng([seed, t])`) draws the batch type, so every host
computes the same global batch without talking to the others:

- monolingual (X-X-mono) with probability α: one language L, drawn uniformly over the eligible languages or by
  `config.data.mono_lang_weights`; every pair of the global batch is (q_L, p_L).
- cross-lingual (X-Y) with probability 1 - α: each pair draws its own ordered (X, Y), X != Y, uniformly among
  the languages of its unit; the pair is (q_X, p_Y). Units with a single language never enter X-Y batches.

Within a global batch each unit appears at most once, and no two pairs share an *answer group*: units are in
one group when they share a positive text in any language (a few MLQA-R questions share their answer sentence),
closed transitively (`answer_groups`). So no pair's passage, in any language, is another pair's answer, which no
`unit_id` mask could catch; `mlret.data.pipeline` keeps the groups' texts out of the hard negatives too.
Across steps units are drawn independently (with replacement), so a run of T steps sees each unit about
T * B / N times.

Sources mix per pair: with `mixture="size"` every eligible unit is equally likely (sources weigh by their
size); with `mixture="weights"` a pair's source is drawn by the configured weights (renormalised over the
sources that have units for the batch: a monolingual source never feeds X-Y batches), then a unit uniformly
within it.

Eligibility is checked up front, with errors that name the config field: a language enters X-X-mono batches
only if the mixture has at least B units in it; α > 0 needs one such language, α < 1 needs B multilingual
units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from mlret.data.units import CROSS_LINGUAL, LANG_INDEX, LANGUAGES, MONOLINGUAL, ParallelUnit
from mlret.errors import DataError

log = logging.getLogger(__name__)

# Streams of the per-step PRNG: np.random.default_rng([seed, step, stream, ...]).
STREAM_PLAN = 0
STREAM_NEGATIVES = 1


def text_hash(text: str) -> int:
    """A stable 63-bit hash of a text (Python's hash() differs between processes; hosts must agree)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


# Rejection rounds of `random_order` before it lists the untried positions exactly (O(pool) once).
_REJECTION_ROUNDS = 4


def random_order(rng: np.random.Generator, n: int, first: int) -> Iterator[int]:
    """Positions 0..n-1 in a uniformly random order, drawn lazily: a consumer that stops early pays for what it
    took, not for the pool.

    The first `first` positions come from one `rng.choice(n, first, replace=False)` (O(first)); a consumer that
    wants more (many key collisions: rare) gets further positions by rejection, `_REJECTION_ROUNDS` rounds of
    uniform draws that skip the positions already given; only then are the untried positions listed and
    shuffled (O(n), needed only when the pool is nearly exhausted). Every position is given exactly once, and
    at each point the next one is uniform over those not yet given, so the order is that of a full
    permutation.
    """
    if n <= 0:
        return
    head = rng.choice(n, size=min(n, first), replace=False)
    yield from (int(i) for i in head)
    if len(head) == n:
        return
    given = set(head.tolist())
    batch = max(first, 16)
    for _ in range(_REJECTION_ROUNDS):
        for i in rng.integers(n, size=batch).tolist():
            if i not in given:
                given.add(i)
                yield i
        if len(given) == n:
            return
    untried = np.ones(n, bool)
    untried[np.fromiter(given, np.int64, len(given))] = False
    rest = np.flatnonzero(untried)
    yield from (int(i) for i in rest[rng.permutation(len(rest))])


@dataclasses.dataclass(frozen=True)
class UnitIndex:
    """What the schedule knows of every unit of the mixture, in global unit order (sources concatenated).

    `langs` are the LANGUAGES indices present in the mixture (the columns of the arrays below).
    """

    langs: tuple[int, ...]
    mask: np.ndarray  # bool [N, C]: unit has the language
    pos_hash: np.ndarray  # int64 [N, C]: text_hash of the positive in that language (0 where absent)
    n_neg: np.ndarray  # int32 [N, C]: number of hard negatives in that language
    source: np.ndarray  # int32 [N]: index into source_names
    source_names: tuple[str, ...]
    answer: np.ndarray  # int64 [N]: answer group (`answer_groups`)

    @property
    def num_units(self) -> int:
        return int(self.mask.shape[0])

    def column(self, lang: int) -> int:
        return self.langs.index(lang)

    def answer_texts(self, units: np.ndarray) -> set[int]:
        """text_hash of every positive, in every language, of every unit in the answer groups of `units`: the
        passages relevant to some pair of a batch of `units`, so never a negative in it."""
        members = np.isin(self.answer, self.answer[np.asarray(units)])
        return set(self.pos_hash[members][self.mask[members]].tolist())

    def offsets(self) -> np.ndarray:
        """Global index of the first unit of each source."""
        counts = np.bincount(self.source, minlength=len(self.source_names))
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @staticmethod
    def from_units(sources: Sequence[tuple[str, Iterable[ParallelUnit]]]) -> UnitIndex:
        """Index of the units of several sources, `[(name, units), ...]`, in that order. Each source's units are
        read once, in order, and only their languages, positive hashes and negative counts are kept, so an
        iterator over a large store is fine."""
        rows = [(s, {LANG_INDEX[lang]: (text_hash(t.positive), len(t.negatives)) for lang, t in u.texts.items()})
                for s, (_, units) in enumerate(sources) for u in units]
        present = sorted({lang for _, d in rows for lang in d})
        col = {lang: c for c, lang in enumerate(present)}
        n, c = len(rows), len(present)
        mask = np.zeros((n, c), bool)
        pos_hash = np.zeros((n, c), np.int64)
        n_neg = np.zeros((n, c), np.int32)
        for i, (_, d) in enumerate(rows):
            for lang, (h, k) in d.items():
                mask[i, col[lang]], pos_hash[i, col[lang]], n_neg[i, col[lang]] = True, h, k
        source = np.array([s for s, _ in rows], np.int32)
        return UnitIndex(tuple(present), mask, pos_hash, n_neg, source, tuple(name for name, _ in sources),
                         answer_groups(mask, pos_hash))


def answer_groups(mask: np.ndarray, pos_hash: np.ndarray) -> np.ndarray:
    """int64 [N]: the connected components of the units under "share a positive text" (same text hash, in any
    language column), so the translations of a shared answer sentence tie their units into one group."""
    n = mask.shape[0]
    units, cols = np.nonzero(mask)
    _, text = np.unique(pos_hash[units, cols], return_inverse=True)  # unit -> text node edges
    nodes = n + int(text.max(initial=-1)) + 1
    graph = sparse.coo_matrix((np.ones(len(units), np.int8), (units, n + text.ravel())), shape=(nodes, nodes))
    return csgraph.connected_components(graph, directed=False)[1][:n].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """The knobs of the schedule (from config.data and config.seed)."""

    seed: int
    alpha: float
    global_batch: int
    group_size: int = 1
    mixture: str = "size"  # size | weights
    source_weights: tuple[float, ...] | None = None  # per source, for mixture="weights"
    mono_lang_weights: Mapping[str, float] | None = None  # None: uniform over eligible languages


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """The global batch of one step, before texts: which unit and languages each pair uses."""

    step: int
    batch_type: int  # MONOLINGUAL or CROSS_LINGUAL
    unit: np.ndarray  # int64 [B]: global unit index
    query_lang: np.ndarray  # int32 [B]: index into LANGUAGES
    passage_lang: np.ndarray  # int32 [B]

    def host_slice(self, process_index: int, process_count: int) -> slice:
        b = len(self.unit) // process_count
        return slice(process_index * b, (process_index + 1) * b)


def parse_lang_weights(text: str) -> dict[str, float]:
    """"en=2,de=1" -> {"en": 2.0, "de": 1.0}; raises ValueError naming the bad item."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        lang, sep, w = item.partition("=")
        lang = lang.strip()
        if not sep or lang not in LANG_INDEX:
            raise ValueError(f"{item!r} is not LANG=WEIGHT with LANG an ISO code in mlret.data.LANGUAGES")
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"{item!r}: weight {w!r} is not a number") from None
        if weight < 0:
            raise ValueError(f"{item!r}: weight must be >= 0")
        out[lang] = weight
    if out and sum(out.values()) <= 0:
        raise ValueError("the weights sum to 0")
    return out


class HybridSchedule:
    """`plan(step)`: the global batch plan of a step, a pure function of (spec, index, step)."""

    def __init__(self, index: UnitIndex, spec: ScheduleSpec) -> None:
        self.index, self.spec = index, spec
        B = spec.global_batch
        S = len(index.source_names)
        if spec.mixture == "weights":
            w = np.asarray(spec.source_weights if spec.source_weights is not None else [1.0] * S, float)
            if w.shape != (S,) or (w < 0).any() or w.sum() <= 0:
                raise DataError(f"config.data.sources[*].weight: need {S} non-negative weights with a positive "
                                f"sum, got {list(w)}")
        else:
            w = None
        self._weights = w
        self._fill_pools: dict[int, np.ndarray] = {}
        counts = np.bincount(index.source, minlength=S)
        for s, name in enumerate(index.source_names):
            if (w is None or w[s] > 0) and counts[s] < B:
                raise DataError(f"config.data.sources[{s}] ({name}): {counts[s]} units, fewer than "
                                f"config.data.global_batch={B}: its weight could not be honoured; lower the "
                                "global batch or merge the source with another")
        active = np.ones(S, bool) if w is None else w > 0
        # Pools of global unit indices per source: mono per language column, cross (>= 2 languages).
        multi = index.mask.sum(1) >= 2
        self._mono = [[np.flatnonzero(index.mask[:, c] & (index.source == s)) if active[s] else
                       np.zeros(0, np.int64) for s in range(S)] for c in range(len(index.langs))]
        self._cross = [np.flatnonzero(multi & (index.source == s)) if active[s] else np.zeros(0, np.int64)
                       for s in range(S)]
        mono_sizes = np.array([sum(len(p) for p in pools) for pools in self._mono], dtype=np.int64)
        eligible = [c for c in range(len(index.langs)) if mono_sizes[c] >= B]
        self.mono_pool_sizes = {LANGUAGES[index.langs[c]]: int(mono_sizes[c]) for c in range(len(index.langs))}
        self.cross_pool_size = int(sum(len(p) for p in self._cross))
        # Mono language distribution over columns.
        probs = np.zeros(len(index.langs))
        if spec.mono_lang_weights:
            for lang, wt in spec.mono_lang_weights.items():
                if LANG_INDEX[lang] not in index.langs:
                    raise DataError(f"config.data.mono_lang_weights: {lang} has no units in the sources "
                                    f"(languages: {', '.join(LANGUAGES[i] for i in index.langs)})")
                c = index.column(LANG_INDEX[lang])
                if wt > 0 and c not in eligible:
                    raise DataError(f"config.data.mono_lang_weights: {lang} has {mono_sizes[c]} units, fewer than "
                                    f"config.data.global_batch={B}, so it cannot fill a monolingual batch")
                probs[c] = wt
        else:
            probs[eligible] = 1.0
            skipped = [LANGUAGES[index.langs[c]] for c in range(len(index.langs)) if c not in eligible]
            if skipped and spec.alpha > 0:
                log.warning("languages with fewer than %d units never get a monolingual batch: %s", B,
                            ", ".join(f"{lang} ({self.mono_pool_sizes[lang]})" for lang in skipped))
        if spec.alpha > 0 and probs.sum() <= 0:
            raise DataError(f"config.data.alpha={spec.alpha} asks for monolingual batches, but no language has "
                            f"config.data.global_batch={B} units (per language: {self.mono_pool_sizes}); lower "
                            "the global batch or add data")
        self.mono_probs = probs / probs.sum() if probs.sum() > 0 else probs
        if spec.alpha < 1 and self.cross_pool_size < B:
            raise DataError(f"config.data.alpha={spec.alpha} asks for cross-lingual batches, but only "
                            f"{self.cross_pool_size} units have two or more languages, fewer than "
                            f"config.data.global_batch={B}; set alpha=1 or add multilingual sources")
        # Hard-negative fill (see mlret.data.pipeline): a pair whose unit has fewer than G-1 negatives in Y
        # takes other units' positives in Y (then in other languages), never one of the batch's answer groups;
        # Y should have enough units for that.
        need = spec.group_size - 1
        if need > 0:
            for c in range(len(index.langs)):
                short = index.mask[:, c] & (index.n_neg[:, c] < need)
                total = int(index.mask[:, c].sum())
                if short.any() and total < B + need:
                    raise DataError(
                        f"config.data.group_size={spec.group_size}: {int(short.sum())} units in "
                        f"{LANGUAGES[index.langs[c]]} have fewer than {need} hard negatives and the language has "
                        f"only {total} units to fill them from (needs global_batch + {need} = {B + need}); lower "
                        "group_size or the global batch, or drop the language from the source")

    # ----------------------------------------------------------------------------------------------- sampling

    def _allocate(self, rng: np.random.Generator, capacities: np.ndarray) -> np.ndarray:
        """Pairs per source: i.i.d. draws by the mixture weights, moved to other sources where one runs
        dry."""
        B = self.spec.global_batch
        base = capacities.astype(float) if self._weights is None else self._weights * (capacities > 0)
        counts = np.zeros(len(capacities), np.int64)
        left = B
        while left > 0:
            room = capacities - counts
            w = np.where(room > 0, base, 0.0)
            if w.sum() <= 0:
                raise DataError("the sources hold fewer units than the global batch")  # excluded by __init__
            counts += rng.multinomial(left, w / w.sum())
            over = np.maximum(counts - capacities, 0)
            counts -= over
            left = int(over.sum())
        return counts

    @staticmethod
    def _draw(rng: np.random.Generator, pool: np.ndarray, k: int, key_fn, used_keys: set) -> list[tuple]:
        """k distinct units of `pool` (uniform, without replacement) whose key is not yet used; returns the
        accepted (unit, key...) tuples from key_fn."""
        out: list[tuple] = []
        if k == 0:
            return out
        seen_units = set()
        skipped = []
        for pos in random_order(rng, len(pool), 2 * k + 8):
            u = int(pool[pos])
            item = key_fn(u)
            if item[-1] in used_keys:
                skipped.append(item)
                continue
            used_keys.add(item[-1])
            seen_units.add(u)
            out.append(item)
            if len(out) == k:
                return out
        # Only units of answer groups already in the batch are left: take them rather than fail (units stay
        # distinct), and say so: their answers are false negatives for each other.
        if skipped:
            log.warning("the pool ran out of answer groups: %d pairs of this batch share an answer group",
                        min(len(skipped), k - len(out)))
        for item in skipped:
            if item[0] not in seen_units:
                seen_units.add(item[0])
                out.append(item)
                if len(out) == k:
                    break
        return out

    def plan(self, step: int) -> BatchPlan:
        """The global batch plan of `step` (deterministic in seed, step and the data)."""
        spec, index = self.spec, self.index
        rng = np.random.default_rng([spec.seed, step, STREAM_PLAN])
        mono = bool(rng.random() < spec.alpha)
        used: set = set()
        pairs: list[tuple[int, int, int]] = []  # (unit, query column, passage column)
        if mono:
            c = int(rng.choice(len(self.mono_probs), p=self.mono_probs))
            pools = self._mono[c]
            counts = self._allocate(rng, np.array([len(p) for p in pools]))
            for pool, k in zip(pools, counts):
                items = self._draw(rng, pool, int(k), lambda u: (u, int(index.answer[u])), used)
                pairs += [(u, c, c) for u, _ in items]
        else:
            pools = self._cross
            counts = self._allocate(rng, np.array([len(p) for p in pools]))

            def key_fn(u: int) -> tuple:
                cols = np.flatnonzero(index.mask[u])
                k = len(cols)
                r = int(rng.integers(k * (k - 1)))  # an ordered pair of distinct languages, uniformly
                x, y = divmod(r, k - 1)
                y = y + 1 if y >= x else y
                return u, int(cols[x]), int(cols[y]), int(index.answer[u])

            for pool, k in zip(pools, counts):
                pairs += [(u, x, y) for u, x, y, _ in self._draw(rng, pool, int(k), key_fn, used)]
        # Shuffle so that a host's slice mixes sources (the allocation above groups them).
        order = rng.permutation(len(pairs))
        langs = np.asarray(index.langs, np.int32)
        unit = np.array([pairs[i][0] for i in order], np.int64)
        return BatchPlan(step=step, batch_type=MONOLINGUAL if mono else CROSS_LINGUAL, unit=unit,
                         query_lang=langs[[pairs[i][1] for i in order]],
                         passage_lang=langs[[pairs[i][2] for i in order]])

    def fill_candidates(self, lang: int) -> np.ndarray:
        """All units (global indices) that have LANGUAGES[lang]: where hard-negative fill comes from (computed
        once per language: a pair that needs a fill must not pay a scan of the mixture)."""
        if lang not in self._fill_pools:
            self._fill_pools[lang] = np.flatnonzero(self.index.mask[:, self.index.column(lang)])
        return self._fill_pools[lang]

    def expected_cross_pair_freq(self) -> dict[tuple[str, str], float]:
        """P((X, Y)) of one X-Y pair under the mixture (before the shared-positive rule, which barely moves
        it): the unit's probability times 1 / (k (k - 1)) for each ordered pair of its k languages."""
        index, S = self.index, len(self.index.source_names)
        sizes = np.array([len(p) for p in self._cross], float)
        src_p = sizes / sizes.sum() if self._weights is None else (
            self._weights * (sizes > 0) / (self._weights * (sizes > 0)).sum())
        out: dict[tuple[str, str], float] = {}
        for s in range(S):
            if sizes[s] == 0:
                continue
            for u in self._cross[s]:
                cols = np.flatnonzero(index.mask[u])
                k = len(cols)
                p = src_p[s] / sizes[s] / (k * (k - 1))
                for a in cols:
                    for b in cols:
                        if a != b:
                            key = (LANGUAGES[index.langs[a]], LANGUAGES[index.langs[b]])
                            out[key] = out.get(key, 0.0) + p
        return out

    def describe(self) -> str:
        mono = {lang: round(float(p), 4) for lang, p in zip((LANGUAGES[i] for i in self.index.langs),
                                                             self.mono_probs) if p > 0}
        return (f"hybrid schedule: alpha={self.spec.alpha}, global_batch={self.spec.global_batch}, "
                f"{self.index.num_units} units from {', '.join(self.index.source_names)}; monolingual languages "
                f"{mono}; {self.cross_pool_size} units eligible for X-Y batches")
