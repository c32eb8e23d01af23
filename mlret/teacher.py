"""The frozen teacher of multilingual embedding distillation (`config.loss.terms` with `embed_distill`,
`mlret.losses.embed_distill`): its embeddings of every training unit's source-language query and positive, computed
once before training and handed to the data pipeline (`mlret.data.pipeline.TeacherTargets`), which puts each
pair's rows into its batch (`teacher_query`, `teacher_passage`, `teacher_mask`).

The teacher is loaded as `python -m mlret.evaluate --hf` loads a model (any registered encoder family; its pooling,
normalisation and prefixes from its sentence-transformers files: no prompts there, no prefixes; a plain
transformers folder keeps config.model's, as for a frozen copy of the student's start), placed on the run's mesh
and encoded with evaluation's `ShardedEmbedder` (packed, sharded like the student), at most at the student's
training lengths.
Then it is dropped: training holds the targets only (2 x units x D float32 on the host).

Units without a text in `source_lang` get no target (mask 0; the loss leaves them out). A source none of whose
units has one is refused (naming source_lang) unless `missing_source_lang="leave_out"`. A teacher that is not a
model folder or hub id, and a teacher whose embedding size differs from the student's (mlret has no projection
layer), are configuration errors naming the field.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlret.data.pipeline import Sources, TeacherTargets
from mlret.errors import ConfigError
from mlret.losses import parse_terms

log = logging.getLogger(__name__)

FIELD = "config.loss.embed_distill"


def active(config: Any) -> bool:
    """Whether the run's loss distills embeddings (config.loss.terms names embed_distill)."""
    return "embed_distill" in parse_terms(config.loss.terms)


def source_texts(sources: Sources, lang: str, missing: str = "error",
                 chunk: int = 1024) -> tuple[list[str], list[str], np.ndarray]:
    """(queries, positives, has) of every unit of `sources` in global unit order: the unit's `lang` texts, "" and
    has=False where it has none. A source none of whose units has `lang`: ConfigError naming source_lang with
    `missing="error"`, its units left out (has=False) with "leave_out"."""
    queries, positives, has = [], [], []
    for name, store in sources:
        found = 0
        for start in range(0, len(store), chunk):
            for unit in store.get(range(start, min(start + chunk, len(store)))):
                t = unit.texts.get(lang)
                queries.append(t.query if t else "")
                positives.append(t.positive if t else "")
                has.append(t is not None)
                found += t is not None
        if len(store) and not found and missing == "error":
            raise ConfigError(f"{FIELD}.source_lang: no unit of the training source {name} has a {lang!r} text; "
                              "pick a language the sources hold (the teacher embeds it), drop the source, or set "
                              f"{FIELD}.missing_source_lang=leave_out to train on its units without this term")
    return queries, positives, np.asarray(has, bool)


def load_teacher(config: Any) -> tuple[Any, Any]:
    """(config for the teacher, its DualEncoder), loaded as `mlret.evaluate --hf` loads a model; the student's
    lengths are the upper bound of the teacher's. Raises ConfigError naming config.loss.embed_distill.teacher."""
    from mlret.evaluate import apply_st_settings  # lazy: transformers
    from mlret.models import load_dual_encoder, resolve_model_dir  # lazy: transformers

    name = str(config.loss.embed_distill.teacher)
    tconfig = copy.deepcopy(config)
    try:
        model_dir = str(resolve_model_dir(name))
        tconfig.model.name = model_dir
        applied = apply_st_settings(tconfig, model_dir)
        if any((Path(model_dir) / f).is_file() for f in ("config_sentence_transformers.json", "modules.json")):
            # A sentence-transformers folder: its prompts are the prefixes, none when it has none (the student's
            # must not leak into an English teacher). A plain transformers folder keeps config.model's (the
            # student's: self-distillation from a frozen copy of the start model).
            for field in ("query_prefix", "passage_prefix"):
                tconfig.model[field] = applied.get(f"model.{field}", "")
        for field in ("query_len", "passage_len"):
            tconfig.data[field] = min(int(tconfig.data[field]), int(config.data[field]))
        tconfig.eval.query_len = tconfig.eval.passage_len = 0  # the teacher's own lengths (capped above)
        tconfig.eval.query_prefix = tconfig.eval.passage_prefix = None  # the teacher's own prefixes
        model, _ = load_dual_encoder(tconfig)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{FIELD}.teacher: {name!r} is not a model mlret loads ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return tconfig, model


def teacher_targets(config: Any, sources: Sources, mesh: Any, student_dim: int) -> TeacherTargets:
    """The teacher's embeddings of every unit's source-language query and positive (see the module docstring)."""
    from mlret import parallel  # lazy: jax
    from mlret.eval.encode import embed_spec, place_model  # lazy: jax

    lang = str(config.loss.embed_distill.source_lang)
    t0 = time.perf_counter()
    queries, positives, has = source_texts(sources, lang, str(config.loss.embed_distill.missing_source_lang))
    tconfig, model = load_teacher(config)
    width = int(model.embed_dim)
    if width != student_dim:
        raise ConfigError(f"{FIELD}.teacher: {config.loss.embed_distill.teacher!r} embeds in {width} dimensions, "
                          f"the student in {student_dim}; mlret has no projection layer: pick a teacher of the "
                          "student's size")
    spec = embed_spec(tconfig)
    embedder = spec.embedder(place_model(model, mesh, parallel.parse_rules(tconfig.mesh.rules)), mesh,
                             spec.tokenizer(tconfig.model.name))
    kept = np.flatnonzero(has)
    q = np.zeros((len(has), width), np.float32)
    p = np.zeros((len(has), width), np.float32)
    if len(kept):
        q[kept] = embedder.queries(_take(queries, kept))
        p[kept] = embedder.passages(_take(positives, kept))
    log.info("embed_distill: teacher %s embedded %d of %d units' %r texts in %.1f s", tconfig.model.name,
             len(kept), len(has), lang, time.perf_counter() - t0)
    return TeacherTargets(query=q, passage=p, mask=has.astype(np.float32))


def _take(texts: Sequence[str], idx: np.ndarray) -> list[str]:
    return [texts[i] for i in idx]
