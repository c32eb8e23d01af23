"""Score distillation: a teacher's scores of each query's candidate list, a batch field (`teacher_scores`).

The candidate list of pair i is its own passages `passage[i]` [G, D]: column 0 the positive, 1..G-1 the hard
negatives. The student's score of a candidate is the dot product of the embeddings, q_i . p_i,k (the cosine for a
normalising model), as sentence-transformers' distillation losses score by default (`pairwise_dot_score`).
`teacher_scores` [B, G] float32 holds the teacher's score of the same candidates, NaN where there is none.

- `margin_mse` (Hofstätter et al. 2020; sentence-transformers' `MarginMSELoss`): the mean over (pair, negative) of
  ((s_i0 - s_ik) - (t_i0 - t_ik))^2.
- `kl_distill` (sentence-transformers' `DistillKLDivLoss`): per pair, KL(softmax(t_i / T_t) || softmax(s_i / T_s))
  over its candidates, averaged over the pairs and multiplied by T_s^2.

The rule for candidates without a teacher score (NaN: a hard negative filled from another unit, which no teacher
scored, or a unit mined without a teacher): they are left out of both losses. margin_mse averages over the
(pair, negative) whose positive and negative are both scored; kl_distill takes the softmaxes over a pair's scored
candidates only and averages over the pairs with at least two of them (one candidate has no distribution to
match). A batch with nothing scored gives 0 and no gradient. With every score present both equal
sentence-transformers' losses (tests/test_losses.py checks value and gradient in float64).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mlret.losses.base import LossContext, LossFamily, LossSetup, Term

FIELD = "teacher_scores"
_MASKED = -1e30  # a left-out candidate's logit: exp() is 0, and no NaN or inf reaches the gradient


def student_scores(q: jax.Array, p: jax.Array) -> jax.Array:
    """s[i, k] = q_i . p_i,k in float32: [B, D] x [B, G, D] -> [B, G]."""
    return jnp.einsum("bd,bgd->bg", q.astype(jnp.float32), p.astype(jnp.float32))


def margin_mse(q: jax.Array, p: jax.Array, teacher: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MarginMSE loss over the scored (pair, negative) margins (see the module docstring)."""
    s = student_scores(q, p)
    t = teacher.astype(jnp.float32)
    scored = jnp.isfinite(t)
    pairs = scored[:, :1] & scored[:, 1:]  # [B, G-1]
    t = jnp.where(scored, t, 0.0)
    err = (s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])
    n = jnp.sum(pairs)
    loss = jnp.sum(jnp.where(pairs, err * err, 0.0)) / jnp.maximum(n, 1)
    return loss, {"loss": loss, "scored_margins": n.astype(jnp.float32) / pairs.size}


def kl_distill(q: jax.Array, p: jax.Array, teacher: jax.Array, *, student_temperature: float,
               teacher_temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The KL divergence of the student's candidate distribution from the teacher's (see the module docstring)."""
    s = student_scores(q, p) / student_temperature
    t = teacher.astype(jnp.float32)
    scored = jnp.isfinite(t)
    rows = jnp.sum(scored, axis=1) >= 2
    log_ps = jax.nn.log_softmax(jnp.where(scored, s, _MASKED), axis=1)
    log_pt = jax.nn.log_softmax(jnp.where(scored, t / teacher_temperature, _MASKED), axis=1)
    kl = jnp.sum(jnp.where(scored, jnp.exp(log_pt) * (log_pt - log_ps), 0.0), axis=1)
    n = jnp.sum(rows)
    loss = student_temperature**2 * jnp.sum(jnp.where(rows, kl, 0.0)) / jnp.maximum(n, 1)
    return loss, {"loss": loss, "scored_pairs": n.astype(jnp.float32) / rows.size}


# ------------------------------------------------------------------------------------------ the two families


def _margin_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict()


def _margin_build(options: Any, setup: LossSetup) -> Term:
    def term(emb: Any, fields: Any, temperature: Any) -> tuple[jax.Array, dict]:
        return margin_mse(emb["query"], emb["passage"], fields[FIELD])

    return term


MARGIN_MSE = LossFamily(
    "margin_mse", _margin_defaults, lambda s, loss: (), _margin_build,
    lambda o: "MarginMSE distillation from the teacher's scores (candidates without a score left out)",
    embeddings=("query", "passage"), fields=(FIELD,))


def _kl_defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    # Softmax temperatures of the student's and the teacher's scores (sentence-transformers' DistillKLDivLoss:
    # both 1 by default; the loss is multiplied by student_temperature^2).
    s.student_temperature = 1.0
    s.teacher_temperature = 1.0
    return s


def _kl_validate(s: ml_collections.ConfigDict, ctx: LossContext) -> None:
    for field in ("student_temperature", "teacher_temperature"):
        if not (math.isfinite(s[field]) and s[field] > 0):
            raise ctx.fail(field, f"{s[field]} must be a positive number")


def _kl_build(options: tuple[float, float], setup: LossSetup) -> Term:
    ts, tt = options

    def term(emb: Any, fields: Any, temperature: Any) -> tuple[jax.Array, dict]:
        return kl_distill(emb["query"], emb["passage"], fields[FIELD], student_temperature=ts,
                          teacher_temperature=tt)

    return term


KL_DISTILL = LossFamily(
    "kl_distill", _kl_defaults, lambda s, loss: (float(s.student_temperature), float(s.teacher_temperature)),
    _kl_build,
    lambda o: (f"KL distillation from the teacher's scores (student / teacher temperature {o[0]:g} / {o[1]:g}; "
               "candidates without a score left out)"),
    _kl_validate, embeddings=("query", "passage"), fields=(FIELD,))

LOSSES = (MARGIN_MSE, KL_DISTILL)
