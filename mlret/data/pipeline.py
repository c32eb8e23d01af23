"""The Grain input pipeline: config -> prepared sources -> hybrid schedule -> a host's slice of each global
batch.

`make_train_iterator(config, tokenizer)` returns a checkpointable Grain iterator (`get_state()` /
`set_state()`, and `grain.checkpoint.CheckpointSave` / `CheckpointRestore` inside an orbax
`CheckpointManager`) that yields, for step t = 0, 1, ..., the dict of numpy arrays docs/architecture.md
describes (`query_ids [b, Lq]`, `passage_ids [b, G, Lp]`, `unit_id`, `query_lang`, `passage_lang`,
`batch_type`, `teacher_scores [b, G]`, with b = B / process_count).

Teacher scores: `teacher_scores[i, k]` is the unit's teacher score (`LangText.scores`) of passage k of pair i
(the positive, then the drawn hard negatives), NaN where there is none: a unit without scores, and every negative
filled from another unit (the teacher scored a unit's own negatives against its own query only). The
distillation losses leave NaN candidates out (`mlret.losses.distill`).

Teacher embeddings (multilingual embedding distillation, `mlret.losses.embed_distill`): given `TeacherTargets`
(`mlret.teacher` computes them before training), each pair also carries its unit's rows, `teacher_query [b, D]`,
`teacher_passage [b, D]` (the teacher's embeddings of the unit's query and positive in the source language,
whatever languages the schedule drew) and `teacher_mask [b]` (0 for a unit without a source-language text).

Determinism: the global batch of step t is a function of (seed, t, data) only. Every host computes the same
plan (`HybridSchedule.plan`) and keeps its slice `[process_index * b, (process_index + 1) * b)`; each pair's
hard negatives come from a PRNG keyed by (seed, t, its position in the global batch), so slices computed on
different hosts are exactly the rows of the one-process global batch. The iterator's state is the next step.

Hard negatives (G - 1 per pair, in the passage language Y): drawn at random from the unit's own negatives in
Y, leaving out any text that is an answer, in any language, of a pair of this global batch
(`UnitIndex.answer_texts`: every positive of every unit in the batch's answer groups; it would be a false
negative for that pair's query). When the unit has fewer than G - 1 usable negatives, the rest is filled with
the positives in Y of random other units outside the batch's answer groups, and when Y runs out, with those of
other languages: a pair never repeats its positive as a negative, nor gets a passage of any answer of the batch.
A mixture too small for that raises DataError naming config.data.group_size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from mlret.data import tfds_builders
from mlret.data.schedule import (
    STREAM_NEGATIVES,
    BatchPlan,
    HybridSchedule,
    ScheduleSpec,
    UnitIndex,
    parse_lang_weights,
    random_order,
    text_hash,
)
from mlret.data.sources import SourceSpec, parse_sources, validate_data
from mlret.data.units import LANGUAGES, ParallelUnit
from mlret.errors import DataError

log = logging.getLogger(__name__)

# Grain needs a finite MapDataset; the iterator is stepped far fewer times than this.
_MAX_STEPS = 2**40


class UnitStore(Protocol):
    """Random access to a source's units."""

    def __len__(self) -> int: ...

    def get(self, indices: Sequence[int]) -> list[ParallelUnit]: ...


class ListStore:
    """Units held in memory (tests, small user sets)."""

    def __init__(self, units: Sequence[ParallelUnit]) -> None:
        self.units = list(units)

    def __len__(self) -> int:
        return len(self.units)

    def get(self, indices: Sequence[int]) -> list[ParallelUnit]:
        return [self.units[i] for i in indices]


class TfdsStore:
    """A prepared `mlret_units` split read through `tfds` random access (ArrayRecord)."""

    def __init__(self, data_source: Any) -> None:
        self.ds = data_source

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, indices: Sequence[int]) -> list[ParallelUnit]:
        if not len(indices):
            return []
        return [tfds_builders.decode_unit(r) for r in self.ds.__getitems__([int(i) for i in indices])]


Sources = list[tuple[str, UnitStore]]


@dataclasses.dataclass(frozen=True)
class TeacherTargets:
    """A teacher's embeddings of each unit's source-language query and positive, by global unit index (the order
    of the sources, then of each store): `query` / `passage` float32 [units, D], `mask` float32 [units] (0: no
    source-language text, no target)."""

    query: np.ndarray
    passage: np.ndarray
    mask: np.ndarray

    def rows(self, units: np.ndarray) -> dict[str, np.ndarray]:
        """The batch fields of the pairs of `units`."""
        return {"teacher_query": self.query[units], "teacher_passage": self.passage[units],
                "teacher_mask": self.mask[units]}


def _tfds_dir(config: Any) -> str | None:
    return config.data.tfds_dir or os.environ.get("TFDS_DATA_DIR") or None


def prepare_source(spec: SourceSpec, config: Any) -> tuple[str, UnitStore]:
    """Prepare one source with its TFDS builder (reusing an earlier prepare) and open it for random access."""
    cfg = tfds_builders.units_config(spec.name, local_dir=spec.path, split=spec.split, languages=spec.languages,
                                     paragraph_context=config.data.paragraph_context,
                                     max_negatives=config.data.max_negatives,
                                     on_bad_record=config.data.on_bad_record, options=dict(spec.options))
    builder = tfds_builders.prepare_units(cfg, _tfds_dir(config))
    name = f"{spec.name}:{spec.path or 'download'}:{spec.split}"
    return name, TfdsStore(builder.as_data_source(split=spec.split))


def load_sources(config: Any) -> Sources:
    """Every source of config.data.sources, prepared and opened.

    Under jax.distributed (several processes), process 0 prepares first and the others wait for it, then
    prepare too: on a shared file system they find the data ready, on host-local disks each prepares its own
    copy (preparing is deterministic, so every host holds the same records). Two processes never write one
    dataset directory at the same time. `python -m mlret.data --config C --prepare_only` prepares ahead."""
    specs = parse_sources(config)
    if not specs:
        raise DataError("config.data.sources is empty: name at least one source, e.g. "
                        "({'name': 'mlqa_r', 'path': 'mlqa-r'},) with config.data.data_dir set")
    multi = _process_count() > 1
    if multi:
        if _process_index() != 0:
            multihost_utils.sync_global_devices("mlret.data: sources prepared by process 0")
    sources = [prepare_source(spec, config) for spec in specs]
    if multi and _process_index() == 0:
        multihost_utils.sync_global_devices("mlret.data: sources prepared by process 0")
    return sources


def _process_count() -> int:
    return jax.process_count()


def _process_index() -> int:
    return jax.process_index()


def build_index(sources: Sources, *, chunk: int = 1024) -> UnitIndex:
    """Scan every unit once (languages, positive hashes, negative counts) into the schedule's index."""

    def read(store) -> Iterator[ParallelUnit]:
        for start in range(0, len(store), chunk):
            yield from store.get(range(start, min(start + chunk, len(store))))

    return UnitIndex.from_units([(name, read(store)) for name, store in sources])


def schedule_spec(config: Any) -> ScheduleSpec:
    specs = parse_sources(config)
    return ScheduleSpec(seed=int(config.seed), alpha=float(config.data.alpha),
                        global_batch=int(config.data.global_batch), group_size=int(config.data.group_size),
                        mixture=config.data.mixture, source_weights=tuple(s.weight for s in specs) or None,
                        mono_lang_weights=parse_lang_weights(config.data.mono_lang_weights) or None)


def make_schedule(config: Any, sources: Sources | None = None) -> tuple[HybridSchedule, Sources]:
    """The hybrid schedule of a config (preparing its sources unless given); checks the config's data section
    (`mlret.config.validate` checks the rest)."""
    validate_data(config)
    sources = sources if sources is not None else load_sources(config)
    schedule = HybridSchedule(build_index(sources), schedule_spec(config))
    log.info("%s", schedule.describe())
    return schedule, sources


class BatchAssembler:
    """step -> this host's slice of the global batch (texts drawn, then tokenised to static shapes)."""

    def __init__(self, schedule: HybridSchedule, sources: Sources, tokenizer: Any, *, process_index: int,
                 process_count: int, teacher: TeacherTargets | None = None) -> None:
        B = schedule.spec.global_batch
        if B % process_count:
            raise DataError(f"config.data.global_batch={B} is not divisible by the {process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
        self.schedule, self.sources, self.tokenizer = schedule, sources, tokenizer
        self.process_index, self.process_count = process_index, process_count
        self.offsets = schedule.index.offsets()
        self.group_size = schedule.spec.group_size
        self.teacher = teacher
        if teacher is not None and len(teacher.mask) != schedule.index.num_units:
            raise ValueError(f"TeacherTargets for {len(teacher.mask)} units, the sources hold "
                             f"{schedule.index.num_units}")

    def _units(self, global_ids: Sequence[int]) -> list[ParallelUnit]:
        """Fetch units by global index, one batched read per source."""
        global_ids = np.asarray(global_ids, np.int64)
        src = np.searchsorted(self.offsets, global_ids, side="right") - 1
        out: list[ParallelUnit | None] = [None] * len(global_ids)
        for s in np.unique(src):
            where = np.flatnonzero(src == s)
            for k, u in zip(where, self.sources[s][1].get(global_ids[where] - self.offsets[s])):
                out[k] = u
        return out  # type: ignore[return-value]

    def texts(self, step: int) -> tuple[BatchPlan, slice, list[str], list[list[str]]]:
        """The plan, this host's slice, and its queries and passage groups (positive first) as text."""
        return self.draw(step)[:4]

    def draw(self, step: int) -> tuple[BatchPlan, slice, list[str], list[list[str]], list[list[float]]]:
        """`texts(step)` and, per group, the teacher's score of each passage (NaN where there is none)."""
        sched, index = self.schedule, self.schedule.index
        plan = sched.plan(step)
        sl = plan.host_slice(self.process_index, self.process_count)
        need = self.group_size - 1
        # Every answer of the global batch, in every language: never used as anyone's negative.
        answers = index.answer_texts(plan.unit)
        groups_in_batch = set(index.answer[plan.unit].tolist())
        units = self._units(plan.unit[sl])
        queries, groups, fills, scores = [], [], [], []
        for i, unit in enumerate(units):
            g = sl.start + i  # position in the global batch: keys the pair's PRNG, whatever the host count
            x, y = LANGUAGES[plan.query_lang[g]], LANGUAGES[plan.passage_lang[g]]
            yi = int(plan.passage_lang[g])
            positive = unit.texts[y].positive
            queries.append(unit.texts[x].query)
            rng = np.random.default_rng([sched.spec.seed, step, STREAM_NEGATIVES, g])
            own = list(dict.fromkeys(n for n in unit.texts[y].negatives if text_hash(n) not in answers))
            chosen = [own[k] for k in rng.permutation(len(own))[:need]] if need else []
            fill: list[tuple[int, str]] = []
            if len(chosen) < need:
                fill = self._fill(rng, yi, need - len(chosen), groups_in_batch, answers,
                                  {text_hash(n) for n in chosen})
                if len(chosen) + len(fill) < need:
                    raise DataError(f"step {step}: pair {g} needs {need} hard negatives "
                                    f"(config.data.group_size={self.group_size}) but only {len(chosen) + len(fill)} "
                                    "distinct passages in any language lie outside the batch's answers; lower "
                                    "config.data.group_size or add data")
            groups.append([positive] + chosen)
            fills.append(fill)
            t = unit.texts[y]
            scored = dict(zip(reversed((t.positive, *t.negatives)), reversed(t.scores))) if t.scores else {}
            scores.append([scored.get(x, math.nan) for x in groups[-1]] + [math.nan] * len(fill))
        # Filled negatives: the positives of the chosen other units (one batched read per source).
        flat = [u for f in fills for u, _ in f]
        fetched = iter(self._units(flat)) if flat else iter(())
        for group, f in zip(groups, fills):
            group += [next(fetched).texts[lang].positive for _, lang in f]
        return plan, sl, queries, groups, scores

    def _fill(self, rng: np.random.Generator, lang: int, k: int, groups_in_batch: set[int], answers: set[int],
              taken: set[int]) -> list[tuple[int, str]]:
        """Up to k (unit, language) whose positives are distinct fill negatives: in `lang` first, then in the
        other languages of the mixture in random order."""
        index = self.schedule.index
        others = [x for x in index.langs if x != lang]
        out: list[tuple[int, str]] = []
        keys = set(taken)
        for x in [lang] + [others[i] for i in rng.permutation(len(others))]:
            out += [(u, LANGUAGES[x]) for u in self._fill_units(rng, x, k - len(out), groups_in_batch, answers, keys)]
            if len(out) == k:
                break
        return out

    def _fill_units(self, rng: np.random.Generator, lang: int, k: int, groups_in_batch: set[int],
                    answers: set[int], keys: set[int]) -> list[int]:
        """Up to k units of `lang` outside the batch's answer groups whose positives in `lang` are not in
        `answers` nor `keys` (which collects the accepted ones)."""
        index = self.schedule.index
        c = index.column(lang)
        pool = self.schedule.fill_candidates(lang)
        out: list[int] = []
        for pos in random_order(rng, len(pool), 4 * k + 16):
            u = int(pool[pos])
            h = int(index.pos_hash[u, c])
            if int(index.answer[u]) in groups_in_batch or h in answers or h in keys:
                continue
            keys.add(h)
            out.append(u)
            if len(out) == k:
                return out
        return out

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        plan, sl, queries, groups, scores = self.draw(int(step))
        b, G = len(queries), self.group_size
        tok = self.tokenizer  # thread-safe: TextTokenizer keeps a copy per thread
        q = tok.queries(queries)
        p = tok.passages([t for group in groups for t in group])
        out = {
            "query_ids": q["query_ids"], "query_mask": q["query_mask"],
            "passage_ids": p["passage_ids"].reshape(b, G, -1), "passage_mask": p["passage_mask"].reshape(b, G, -1),
            "unit_id": plan.unit[sl].astype(np.int32),
            "query_lang": plan.query_lang[sl].astype(np.int32),
            "passage_lang": plan.passage_lang[sl].astype(np.int32),
            "batch_type": np.full(b, plan.batch_type, np.int32),
            "teacher_scores": np.asarray(scores, np.float32).reshape(b, G),
        }
        if self.teacher is not None:
            out.update(self.teacher.rows(plan.unit[sl]))
        return out


def make_dataset(config: Any, tokenizer: Any, *, process_index: int | None = None,
                 process_count: int | None = None, sources: Sources | None = None,
                 teacher: TeacherTargets | None = None) -> grain.IterDataset:
    """The Grain IterDataset behind `make_train_iterator` (element t = this host's slice of step t)."""
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    schedule, sources = make_schedule(config, sources)
    assembler = BatchAssembler(schedule, sources, tokenizer, process_index=process_index,
                               process_count=process_count, teacher=teacher)
    d = config.data
    ds = grain.MapDataset.range(0, _MAX_STEPS).map(assembler).to_iter_dataset(
        grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.prefetch))
    if d.worker_count > 0:
        # Grain workers read absl flags, which raise UnparsedFlagAccessError in a plain script
        # (google/grain#1362).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count,
                                                         per_worker_buffer_size=max(1, d.prefetch)))
    return ds


def make_train_iterator(config: Any, tokenizer: Any, *, process_index: int | None = None,
                        process_count: int | None = None, sources: Sources | None = None,
                        teacher: TeacherTargets | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator over this host's slices of the global batches of steps 0, 1, 2, ...

    `tokenizer` is a `mlret.models.TextTokenizer` (anything with `.queries(texts)` / `.passages(texts)`).
    process_index / process_count default to jax's. Resume with `it.set_state(state)` (or orbax's
    `grain.checkpoint.CheckpointRestore(it)`): the restored iterator yields exactly the batches an
    uninterrupted one would. `teacher`: the embedding distillation's targets (`mlret.teacher.teacher_targets`).
    """
    return iter(make_dataset(config, tokenizer, process_index=process_index, process_count=process_count,
                             sources=sources, teacher=teacher))
