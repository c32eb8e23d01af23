"""The hybrid schedule on real MLQA-R units: batch-type fractions, language rules, uniqueness, frequencies.

Schedule only (no TFDS, no tokenisation), so 2,000 steps per setting take about a second. The PRNG is seeded,
so each check is deterministic; the tolerances are what a correct sampler passes with high probability
(3 standard errors, chi-square p > 1e-3), and a wrong weight or a wrong rule fails them.
"""

import collections
import itertools

import numpy as np
import pytest
from scipy import stats

from mlret.data import readers
from mlret.data.schedule import HybridSchedule, ScheduleSpec, UnitIndex, random_order
from mlret.data.units import CROSS_LINGUAL, LANGUAGES, MONOLINGUAL, LangText, ParallelUnit
from mlret.errors import DataError

STEPS = 2000
B = 32
MLQA = ("ar", "de", "en", "es", "hi", "vi", "zh")


@pytest.fixture(scope="module")
def mlqa_units(shared_data):
    return readers.read_squad_sentences({lang: shared_data / "mlqa-r" / f"{lang}.json" for lang in MLQA},
                                        source="mlqa_r")


@pytest.fixture(scope="module")
def mlqa_index(mlqa_units):
    return UnitIndex.from_units([("mlqa_r", mlqa_units)])


def _plans(index, **kw):
    spec = ScheduleSpec(**{"seed": 0, "global_batch": B, "group_size": 2, **kw})
    schedule = HybridSchedule(index, spec)
    return schedule, [schedule.plan(t) for t in range(STEPS)]


def _check_rules(index, units, plans):
    langs_of = [set(u.texts) for u in units]
    for plan in plans:
        assert len(plan.unit) == B
        assert len(set(plan.unit.tolist())) == B, f"step {plan.step}: a unit repeats within the global batch"
        q = [LANGUAGES[i] for i in plan.query_lang]
        p = [LANGUAGES[i] for i in plan.passage_lang]
        for u, x, y in zip(plan.unit, q, p):
            assert x in langs_of[u] and y in langs_of[u], "a pair uses a language its unit does not have"
        if plan.batch_type == MONOLINGUAL:
            assert len(set(q) | set(p)) == 1, f"step {plan.step}: monolingual batch mixes {set(q) | set(p)}"
        else:
            assert plan.batch_type == CROSS_LINGUAL
            assert all(x != y for x, y in zip(q, p)), f"step {plan.step}: cross-lingual pair with X == Y"
        # No two pairs share a positive text in the same passage language (it would be a false negative).
        keys = [(y, units[u].texts[y].positive) for u, y in zip(plan.unit, p)]
        assert len(set(keys)) == B


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_batch_type_fraction_and_rules(mlqa_units, mlqa_index, alpha):
    schedule, plans = _plans(mlqa_index, alpha=alpha)
    mono = np.mean([p.batch_type == MONOLINGUAL for p in plans])
    if alpha in (0.0, 1.0):
        assert mono == alpha  # X-Y and X-X-mono exactly
    else:
        se = np.sqrt(alpha * (1 - alpha) / STEPS)
        assert abs(mono - alpha) < 3 * se, f"mono fraction {mono:.4f} vs alpha {alpha} (3 SE = {3 * se:.4f})"
    _check_rules(mlqa_index, mlqa_units, plans)


def _chi2_p(observed: dict, expected_prob: dict) -> float:
    keys = sorted(expected_prob)
    assert set(observed) <= set(keys), f"observed outcomes outside the support: {set(observed) - set(keys)}"
    obs = np.array([observed.get(k, 0) for k in keys], float)
    exp = np.array([expected_prob[k] for k in keys]) * obs.sum()
    return float(stats.chisquare(obs, exp / exp.sum() * obs.sum()).pvalue)


def test_mono_languages_uniform(mlqa_index):
    _, plans = _plans(mlqa_index, alpha=1.0)
    counts = collections.Counter(LANGUAGES[p.query_lang[0]] for p in plans)
    assert _chi2_p(counts, {lang: 1 / len(MLQA) for lang in MLQA}) > 1e-3, counts


def test_mono_languages_follow_configured_weights(mlqa_index):
    weights = {"en": 3.0, "de": 1.0, "zh": 2.0}
    _, plans = _plans(mlqa_index, alpha=1.0, mono_lang_weights=weights)
    counts = collections.Counter(LANGUAGES[p.query_lang[0]] for p in plans)
    assert set(counts) == set(weights), "a language with weight 0 got a monolingual batch"
    total = sum(weights.values())
    assert _chi2_p(counts, {k: w / total for k, w in weights.items()}) > 1e-3, counts
    # And a wrong expectation is rejected: the test can fail.
    assert _chi2_p(counts, {lang: 1 / 3 for lang in weights}) < 1e-3


def test_cross_pair_frequencies_match_the_units(mlqa_index):
    schedule, plans = _plans(mlqa_index, alpha=0.0)
    counts = collections.Counter((LANGUAGES[x], LANGUAGES[y]) for p in plans
                                 for x, y in zip(p.query_lang, p.passage_lang))
    expected = schedule.expected_cross_pair_freq()
    assert len(expected) == len(MLQA) * (len(MLQA) - 1)
    assert _chi2_p(counts, expected) > 1e-3
    # The English side dominates (every MLQA-R question has English): the test would notice uniform pairs.
    assert _chi2_p(counts, {k: 1 / len(expected) for k in expected}) < 1e-3


def test_plan_is_a_pure_function_of_seed_and_step(mlqa_index):
    spec = ScheduleSpec(seed=7, alpha=0.5, global_batch=B)
    a, b = HybridSchedule(mlqa_index, spec), HybridSchedule(mlqa_index, spec)
    for t in (0, 1, 999, 123456):
        pa, pb = a.plan(t), b.plan(t)
        assert pa.batch_type == pb.batch_type and np.array_equal(pa.unit, pb.unit)
        assert np.array_equal(pa.query_lang, pb.query_lang) and np.array_equal(pa.passage_lang, pb.passage_lang)
    other = HybridSchedule(mlqa_index, ScheduleSpec(seed=8, alpha=0.5, global_batch=B))
    assert not all(np.array_equal(a.plan(t).unit, other.plan(t).unit) for t in range(5))


def test_source_mixture_weights_and_sizes(mlqa_units):
    # Two sources cut from MLQA-R (sizes about 3:1) to test the mixture arithmetic.
    a, b = mlqa_units[: 3 * len(mlqa_units) // 4], mlqa_units[3 * len(mlqa_units) // 4:]
    index = UnitIndex.from_units([("a", a), ("b", b)])
    for mixture, weights, share_b in (("size", None, len(b) / len(mlqa_units)), ("weights", (0.2, 0.8), 0.8)):
        schedule = HybridSchedule(index, ScheduleSpec(seed=1, alpha=0.0, global_batch=B, mixture=mixture,
                                                      source_weights=weights))
        from_b = [int((index.source[schedule.plan(t).unit] == 1).sum()) for t in range(500)]
        n = 500 * B
        observed = sum(from_b) / n
        # Per-pair source draws are i.i.d. by the weights (cross batches draw from every unit of both).
        se = np.sqrt(share_b * (1 - share_b) / n)
        assert abs(observed - share_b) < 3 * se, (mixture, observed, share_b)


def _unit(uid, langs, negs=1):
    return ParallelUnit(uid, "t", {lang: LangText(f"q {uid} {lang}", f"p {uid} {lang}",
                                                  tuple(f"n{j} {uid} {lang}" for j in range(negs)))
                                   for lang in langs})


def test_errors_name_the_field():
    multi = [_unit(f"m{i}", ["de", "en"]) for i in range(40)]
    mono_only = [_unit(f"s{i}", ["sw"]) for i in range(40)]
    with pytest.raises(DataError, match=r"config.data.sources\[1\].*fewer than config.data.global_batch=32"):
        HybridSchedule(UnitIndex.from_units([("a", multi), ("b", multi[:10])]),
                       ScheduleSpec(seed=0, alpha=0.5, global_batch=32))
    with pytest.raises(DataError, match="cross-lingual batches, but only 0 units"):
        HybridSchedule(UnitIndex.from_units([("sw", mono_only)]), ScheduleSpec(seed=0, alpha=0.5, global_batch=32))
    HybridSchedule(UnitIndex.from_units([("sw", mono_only)]), ScheduleSpec(seed=0, alpha=1.0, global_batch=32))
    # 40 two-language units over four languages: 20 units per language, too few for a batch of 32 in one.
    spread = [_unit(f"r{i}", [("de", "en", "es", "fr")[i % 4], ("de", "en", "es", "fr")[(i + 1) % 4]])
              for i in range(40)]
    with pytest.raises(DataError, match="monolingual batches, but no language has"):
        HybridSchedule(UnitIndex.from_units([("r", spread)]), ScheduleSpec(seed=0, alpha=0.5, global_batch=32))
    HybridSchedule(UnitIndex.from_units([("r", spread)]), ScheduleSpec(seed=0, alpha=0.0, global_batch=32))
    with pytest.raises(DataError, match="mono_lang_weights: fr has no units"):
        HybridSchedule(UnitIndex.from_units([("m", multi)]),
                       ScheduleSpec(seed=0, alpha=0.5, global_batch=32, mono_lang_weights={"fr": 1.0}))
    # One own negative each, G - 1 = 3 needed: the other 2 are filled from units outside the batch, which
    # needs global_batch + 3 units in the language.
    HybridSchedule(UnitIndex.from_units([("m", multi)]), ScheduleSpec(seed=0, alpha=0.5, global_batch=32,
                                                                      group_size=4))
    with pytest.raises(DataError, match=r"group_size=4: 40 units in de have fewer than 3 hard negatives"):
        HybridSchedule(UnitIndex.from_units([("m", multi)]), ScheduleSpec(seed=0, alpha=0.5, global_batch=38,
                                                                          group_size=4))


@pytest.mark.parametrize("n,first", [(1, 8), (7, 3), (40, 8), (300, 16)])
def test_random_order_gives_every_position_once(n, first):
    # Past `first` the order comes from rejection rounds, then from the exact list of untried positions.
    order = list(random_order(np.random.default_rng(n), n, first))
    assert sorted(order) == list(range(n))


def test_random_order_is_uniform_and_lazy():
    # Every position is equally likely at every rank: the head (choice), the rejection rounds and the exact tail.
    n, runs = 6, 6000
    counts = np.zeros((n, n))
    rng = np.random.default_rng(0)
    for _ in range(runs):
        for rank, pos in enumerate(random_order(rng, n, 2)):
            counts[rank, pos] += 1
    for rank in range(n):
        assert stats.chisquare(counts[rank]).pvalue > 1e-3, f"rank {rank}: {counts[rank]}"
    # Lazy: 50 positions of a pool of 10^12 cost 50 draws, never a pass over the pool.
    taken = list(itertools.islice(random_order(np.random.default_rng(1), 10**12, 8), 50))
    assert len(set(taken)) == 50 and all(0 <= i < 10**12 for i in taken)
