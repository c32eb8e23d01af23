"""Multilingual embedding distillation (Reimers & Gurevych 2020, "Making monolingual sentence embeddings
multilingual using knowledge distillation"; sentence-transformers' `MSELoss`): `config.loss.terms =
"embed_distill"` (alone) or `"contrastive,embed_distill"`, section `config.loss.embed_distill`.

A frozen teacher (`teacher`: any model mlret loads, a folder or hub id) embeds each unit's query and positive in
the source language (`source_lang`, default "en"); the student's embeddings of the pair's query and of its
positive, in whatever languages the hybrid schedule gave them, are pulled to those (mean squared error). The
teacher's embeddings are computed once per run before training (`mlret.data.teacher`) and travel with the batch
as fields: `teacher_query [B, D]`, `teacher_passage [B, D]` (the positive's) and `teacher_mask [B]` (1 where the
unit has a text in the source language). docs/architecture.md ("Loss") says why precomputed and not in the step.

The loss is sentence-transformers' `MSELoss` over the rows with a target: the mean over those rows (queries and
positives) and the D components of (student - teacher)^2. The rule for units without a source-language text (a
monolingual source in another language): left out (teacher_mask 0), as the NaN scores of `mlret.losses.distill`
are; a batch with none gives 0 and no gradient. Hard negatives have no target (they are not translations of a
source text). With Matryoshka dimensions (config.loss.matryoshka_dims) the student's prefix of width d is
compared with the teacher's first d components, L2-normalised again when `matryoshka_normalize` is on, as the
student's prefix is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mlret.losses.base import LossContext, LossFamily, LossSetup, Term

FIELDS = ("teacher_query", "teacher_passage", "teacher_mask")


def embed_mse(q: jax.Array, p: jax.Array, tq: jax.Array, tp: jax.Array,
              mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MSE of the student's query [B, D] and positive [B, D] embeddings against the teacher's [B, D], over the
    rows where `mask` [B] is nonzero: sum of the squared errors / (2 x rows x D), in float32."""
    m = (mask > 0).astype(jnp.float32)[:, None]
    err = (jnp.sum(m * (q.astype(jnp.float32) - tq.astype(jnp.float32)) ** 2)
           + jnp.sum(m * (p.astype(jnp.float32) - tp.astype(jnp.float32)) ** 2))
    rows = jnp.sum(m)
    loss = err / jnp.maximum(2.0 * rows * q.shape[-1], 1.0)
    return loss, {"loss": loss, "distilled_rows": rows / mask.size}


def _target(t: jax.Array, dim: int, normalize: bool) -> jax.Array:
    """The teacher's embedding as the target of a student embedding of width `dim` (a Matryoshka prefix)."""
    if dim == t.shape[-1]:
        return t
    t = t[..., :dim].astype(jnp.float32)
    return t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12) if normalize else t


def _defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    # The frozen teacher: a model folder or hub id that mlret loads (any registered encoder family), embedding in
    # the student's dimension. Its pooling, normalisation and prefixes are its own (its sentence-transformers files).
    s.teacher = ""
    # The language whose text of each unit the teacher embeds (ISO 639-1, mlret.data.LANGUAGES).
    s.source_lang = "en"
    # A training source none of whose units has a source_lang text (a monolingual source in another language):
    # "error" refuses the run naming source_lang; "leave_out" trains on its units without this term (mask 0), as
    # every single unit without a source_lang text is.
    s.missing_source_lang = "error"
    return s


def _validate(s: ml_collections.ConfigDict, ctx: LossContext) -> None:
    if not ctx.active:
        return
    if not str(s.teacher).strip():
        raise ctx.fail("teacher", "empty; name the teacher's model folder or hub id (e.g. an English "
                                  "sentence-transformers model of the student's embedding size)")
    if not str(s.source_lang).strip():
        raise ctx.fail("source_lang", "empty; name the language whose texts the teacher embeds (e.g. \"en\")")
    # A code that no unit of a source has is refused when the targets are built (mlret.teacher), naming the source.
    if s.missing_source_lang not in ("error", "leave_out"):
        raise ctx.fail("missing_source_lang", f"{s.missing_source_lang!r} is not one of error, leave_out")


def _options(s: ml_collections.ConfigDict, loss: Any) -> tuple[str, str, bool]:
    return str(s.teacher), str(s.source_lang), bool(loss.matryoshka_normalize)


def _build(options: tuple[str, str, bool], setup: LossSetup) -> Term:
    normalize = options[2]

    def term(emb: Any, fields: Any, temperature: Any) -> tuple[jax.Array, dict]:
        q, p = emb["query"], emb["passage"][:, 0]
        d = q.shape[-1]
        return embed_mse(q, p, _target(fields["teacher_query"], d, normalize),
                         _target(fields["teacher_passage"], d, normalize), fields["teacher_mask"])

    return term


LOSS = LossFamily(
    "embed_distill", _defaults, _options, _build,
    lambda o: (f"multilingual embedding distillation (MSE of the query and positive embeddings to the frozen "
               f"teacher {o[0]}'s embeddings of the unit's {o[1]!r} text; units without one left out)"),
    _validate, embeddings=("query", "passage"), fields=FIELDS)
