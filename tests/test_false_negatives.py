"""No false negatives in real MLQA-R batches: no column of a query's row is a version, in any language, of its
answer; and no pair ever gets its own positive as a negative.

The batches come from the real schedule and assembler (`HybridSchedule`, `BatchAssembler.texts`) over the
MLQA-R units held in memory: texts only, no TFDS and no tokenisation, so thousands of batches are cheap.
"""

import numpy as np
import pytest

from mlret.data import readers
from mlret.data.pipeline import BatchAssembler, ListStore
from mlret.data.schedule import HybridSchedule, ScheduleSpec, UnitIndex, answer_groups
from mlret.data.units import LANG_INDEX, LangText, ParallelUnit
from mlret.errors import DataError

MLQA = ("ar", "de", "en", "es", "hi", "vi", "zh")
B, G, STEPS = 64, 3, 700  # 2,100 batches over the three alphas of the study


@pytest.fixture(scope="module")
def mlqa_units(shared_data):
    return readers.read_squad_sentences({lang: shared_data / "mlqa-r" / f"{lang}.json" for lang in MLQA},
                                        source="mlqa_r")


@pytest.fixture(scope="module")
def relevant(mlqa_units):
    """unit -> every text relevant to its query: the positive, in every language, of each unit that shares a
    positive text (in any language) with it, itself included."""
    by_text: dict[str, set[int]] = {}
    for u, unit in enumerate(mlqa_units):
        for t in unit.texts.values():
            by_text.setdefault(t.positive, set()).add(u)
    out = []
    for unit in mlqa_units:
        mates = set().union(*(by_text[t.positive] for t in unit.texts.values()))
        out.append({t.positive for m in mates for t in mlqa_units[m].texts.values()})
    return out


def false_negatives(plan, groups, relevant) -> tuple[int, int]:
    """(columns that are relevant to a query of the batch but are neither its label nor masked as another pair
    of the same unit, pairs whose negatives include their own positive)."""
    rows_of: dict[str, list[int]] = {}  # text -> the rows (queries) it is relevant to
    for i, u in enumerate(plan.unit):
        for text in relevant[u]:
            rows_of.setdefault(text, []).append(i)
    count = 0
    for j, group in enumerate(groups):
        for k, text in enumerate(group):
            count += sum(1 for i in rows_of.get(text, ()) if (i, k) != (j, 0) and (i == j or
                                                                                   plan.unit[i] != plan.unit[j]))
    own = sum(group[0] in group[1:] for group in groups)
    return count, own


def _assembler(units, **spec):
    index = UnitIndex.from_units([("s", units)])
    schedule = HybridSchedule(index, ScheduleSpec(**{"seed": 0, "global_batch": B, "group_size": G, **spec}))
    return BatchAssembler(schedule, [("s", ListStore(units))], None, process_index=0, process_count=1)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_no_translation_of_an_answer_is_a_negative(mlqa_units, relevant, alpha):
    asm = _assembler(mlqa_units, alpha=alpha)
    totals = np.zeros(2, int)
    for step in range(STEPS):
        plan, _, _, groups = asm.texts(step)
        assert all(len(g) == G for g in groups)
        totals += false_negatives(plan, groups, relevant)
    assert tuple(totals) == (0, 0), f"{totals[0]} false-negative columns, {totals[1]} own positives as negatives"


def test_the_counter_sees_a_planted_translation(mlqa_units, relevant):
    """The count above can fail: put the translation of pair 0's answer among pair 1's hard negatives."""
    asm = _assembler(mlqa_units, alpha=0.0)
    plan, _, _, groups = asm.texts(0)
    other = next(lang for lang in mlqa_units[plan.unit[0]].texts if LANG_INDEX[lang] != plan.passage_lang[0])
    groups = [list(g) for g in groups]
    groups[1][1] = mlqa_units[plan.unit[0]].texts[other].positive
    assert false_negatives(plan, groups, relevant)[0] == 1
    groups[2][1] = groups[2][0]
    assert false_negatives(plan, groups, relevant)[1] == 1


def test_answer_groups_close_over_shared_texts():
    """u0 and u1 share their German answer, u1 and u2 their English one: one group; u3 stands alone."""
    mask = np.ones((4, 2), bool)
    pos_hash = np.array([[1, 10], [1, 11], [2, 11], [3, 12]])
    groups = answer_groups(mask, pos_hash)
    assert groups[0] == groups[1] == groups[2] != groups[3]


def _unit(uid, lang, positive=None, negs=0):
    return ParallelUnit(uid, "t", {lang: LangText(f"q {uid}", positive or f"p {uid}",
                                                  tuple(f"n{j} {uid}" for j in range(negs)))})


def _small_language_units(with_english: bool):
    """Seven German units without negatives, three of them (d4-d6) one answer group (a shared positive): a batch
    holding that group leaves one German unit to fill two negatives per pair from. English has three units with
    negatives of their own (too few for a monolingual batch)."""
    de = [_unit(f"d{i}", "de") for i in range(4)] + [_unit(f"d{i}", "de", positive="p shared") for i in (4, 5, 6)]
    return de + ([_unit(f"e{i}", "en", negs=2) for i in range(3)] if with_english else [])


def test_short_language_fills_from_other_languages_never_the_own_positive():
    units = _small_language_units(with_english=True)
    index = UnitIndex.from_units([("s", units)])
    schedule = HybridSchedule(index, ScheduleSpec(seed=0, alpha=1.0, global_batch=4, group_size=3,
                                                  mono_lang_weights={"de": 1.0}))
    asm = BatchAssembler(schedule, [("s", ListStore(units))], None, process_index=0, process_count=1)
    english = {u.texts["en"].positive for u in units if "en" in u.texts}
    filled_from_english = 0
    for step in range(30):
        plan, _, _, groups = asm.texts(step)
        answers = {units[u].texts["de"].positive for u in plan.unit}
        for group in groups:
            assert len(set(group)) == 3 and not set(group[1:]) & answers
            filled_from_english += sum(t in english for t in group[1:])
    assert filled_from_english > 0  # the batches holding the shared group needed English fill


def test_a_mixture_too_small_to_fill_is_refused_naming_the_field():
    units = _small_language_units(with_english=False)
    schedule = HybridSchedule(UnitIndex.from_units([("s", units)]),
                              ScheduleSpec(seed=0, alpha=1.0, global_batch=4, group_size=3))
    asm = BatchAssembler(schedule, [("s", ListStore(units))], None, process_index=0, process_count=1)
    with pytest.raises(DataError, match=r"config.data.group_size=3"):
        for step in range(30):
            asm.texts(step)
