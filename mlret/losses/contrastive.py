"""The contrastive loss family (`config.loss.terms = "contrastive"`, section `config.loss.contrastive`): Eq. 1,
InfoNCE, the symmetric forms and VRN, as pure functions of embeddings, and its `LossFamily` record (`LOSS`).

The loss is taken over the **global** batch (t5x_retrieval's in-batch softmax): each query is scored against the
passages of the batch, laid out `[B, G]` (index 0 of pair `i` is its positive, 1..G-1 its hard negatives) and
flattened to `B*G` columns, so the label of query `i` is column `i*G`. Which columns enter query `i`'s
denominator is the variant:

- `in_batch_positives=True` (InfoNCE with in-batch negatives): every passage of the batch.
- `in_batch_positives=False` (Eq. 1 of arXiv 2408.10536 as written): its own positive and the hard negatives of
  **every** pair of the batch, not the other pairs' positives.
- `within_view=True` (arXiv 2506.09781's symmetric form) adds the other queries of the batch to a query's
  denominator and, with `symmetric`, the passages to a positive's.
- `symmetric=True` averages with the passage -> query loss of the positives against every query.
- `vrn_weight = λ > 0` adds VRN (arXiv 2506.09781): `λ · mean over the negative pairs of |cos − δ|^p`, the mean
  taken over every (query, negative passage) pair of the query -> passage term.

One mask holds in every variant and every direction: a column of *another* pair with the same `unit_id` (a
translation of the same QA item, or the item drawn twice) is never a negative, passages and queries alike.

The math knows nothing of models or data. Its only distribution hook is `score_sharding`: the term the record
builds (`LOSS.build`, for the step's mesh) passes a sharding that keeps each score matrix split on its row axis,
so each device holds `B/devices x B*G` scores and only embeddings travel, or, with `config.loss.gather =
"shard_map"`, calls `sharded_contrastive_loss`, which does the same with an explicit `all_gather` under
`shard_map`. Everything is computed in float32 whatever the encoder's compute dtype. The term reads the query
and passage embeddings and the batch's `unit_id`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlret.losses.base import LossContext, LossFamily, LossSetup, Term

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The static choices of the loss (hashable: a jit/shard_map constant).

    symmetric: add the passage -> query direction. in_batch_positives: other pairs' positives are negatives
    (False: Eq. 1 as written). within_view: query-query (and, with symmetric, passage-passage) negatives.
    vrn_weight, vrn_delta, vrn_power: VRN's λ, δ and p (λ = 0: no VRN term).
    """

    symmetric: bool = False
    in_batch_positives: bool = True
    within_view: bool = False
    vrn_weight: float = 0.0
    vrn_delta: float = 0.0
    vrn_power: float = 2.0

    def __post_init__(self) -> None:
        if self.vrn_weight < 0 or self.vrn_power <= 0:
            raise ValueError(f"LossOptions: vrn_weight={self.vrn_weight} must be >= 0 and vrn_power="
                             f"{self.vrn_power} > 0")


def vrn_delta(num_instances: int) -> float:
    """VRN's default target cosine of negative pairs, δ = −1/(k−1) for k training instances (k >= 2)."""
    if num_instances < 2:
        raise ValueError(f"vrn_delta: need at least 2 training instances, got {num_instances}")
    return -1.0 / (num_instances - 1)


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _nll(parts: Sequence[tuple[jax.Array, jax.Array]], label_logit: jax.Array) -> jax.Array:
    """−log softmax of the label over the unmasked entries of the `(logits, valid)` blocks (concatenated)."""
    logits = jnp.concatenate([jnp.where(valid, x, -jnp.inf) for x, valid in parts], axis=1)
    return jax.nn.logsumexp(logits, axis=1) - label_logit


def _rows(q: jax.Array, pos: jax.Array, p_flat: jax.Array, q_all: jax.Array, unit_q: jax.Array, unit_all: jax.Array,
          row_offset: jax.Array | int, *, group_size: int, temperature: jax.Array, opts: LossOptions,
          score_sharding: Any = None) -> dict[str, jax.Array]:
    """Per-row terms of pairs `row_offset .. row_offset+b` of the global batch (summed by the callers, so the
    jit and shard_map paths share this code).

    q: [b, D] their queries; pos: [b, D] their positives; p_flat: [B*G, D] every passage of the batch; q_all:
    [B, D] every query; unit_q: [b]; unit_all: [B].
    """
    b = q.shape[0]
    n_cols = p_flat.shape[0]
    constrain = (lambda s: jax.lax.with_sharding_constraint(s, score_sharding)) if score_sharding is not None else (
        lambda s: s)
    rows = row_offset + jnp.arange(b)  # global pair index of each row
    cols = jnp.arange(n_cols)
    col_pair = cols // group_size
    label_col = rows * group_size
    is_label = cols[None, :] == label_col[:, None]
    own = col_pair[None, :] == rows[:, None]
    other_same_unit = ~own & (unit_all[col_pair][None, :] == unit_q[:, None])
    passage_ok = ~other_same_unit  # [b, B*G]: the passage columns of each row's denominator
    if not opts.in_batch_positives:
        passage_ok &= own | (cols % group_size != 0)[None, :]
    query_ok = unit_all[None, :] != unit_q[:, None]  # [b, B]: other pairs' queries (never the own pair's)

    sim = constrain(q @ p_flat.T)  # raw similarities (cosines when the encoder normalises)
    label_logit = sim[jnp.arange(b), label_col] / temperature
    parts = [(sim / temperature, passage_ok)]
    if opts.within_view:
        parts.append((constrain(q @ q_all.T) / temperature, query_ok))
    out = {"nll": _nll(parts, label_logit)}

    negative = passage_ok & ~is_label
    n_neg = negative.sum(axis=1)
    out["correct"] = (jnp.argmax(jnp.where(passage_ok, sim, -jnp.inf), axis=1) == label_col).astype(jnp.float32)
    out["pos_sim"] = sim[jnp.arange(b), label_col]
    out["neg_sim"] = jnp.where(negative, sim, 0.0).sum(axis=1) / jnp.maximum(n_neg, 1)
    if opts.symmetric:
        pq = constrain(pos @ q_all.T) / temperature  # [b, B]
        parts = [(pq, query_ok | (jnp.arange(q_all.shape[0])[None, :] == rows[:, None]))]
        if opts.within_view:
            parts.append((constrain(pos @ p_flat.T) / temperature, negative))
        out["p2q_nll"] = _nll(parts, pq[jnp.arange(b), rows])
    if opts.vrn_weight:
        cos = constrain(_normalize(q) @ _normalize(p_flat).T)
        out["vrn_sum"] = jnp.where(negative, jnp.abs(cos - opts.vrn_delta) ** opts.vrn_power, 0.0).sum(axis=1)
        out["vrn_count"] = n_neg.astype(jnp.float32)
    return out


def _combine(sums: dict[str, jax.Array], n: int, opts: LossOptions,
             temperature: jax.Array) -> tuple[jax.Array, Metrics]:
    """Batch sums of the per-row terms -> (loss, metrics); `n` is the global batch size."""
    loss = q2p = sums["nll"] / n
    metrics: Metrics = {"loss_q2p": q2p}
    if opts.symmetric:
        metrics["loss_p2q"] = sums["p2q_nll"] / n
        loss = 0.5 * (q2p + metrics["loss_p2q"])
    if opts.vrn_weight:
        metrics["loss_vrn"] = sums["vrn_sum"] / jnp.maximum(sums["vrn_count"], 1.0)
        loss = loss + opts.vrn_weight * metrics["loss_vrn"]
    metrics.update(loss=loss, accuracy=sums["correct"] / n, pos_sim=sums["pos_sim"] / n,
                   neg_sim=sums["neg_sim"] / n, temperature=temperature)
    return loss, metrics


def _check_shapes(q: jax.Array, p: jax.Array) -> None:
    if p.ndim != 3 or q.ndim != 2 or p.shape[0] != q.shape[0] or p.shape[2] != q.shape[1]:
        raise ValueError(f"contrastive_loss: query_emb {q.shape} must be [B, D] and passage_emb {p.shape} "
                         "[B, G, D] with the same B and D")


def contrastive_loss(
    query_emb: jax.Array,
    passage_emb: jax.Array,
    unit_id: jax.Array,
    *,
    temperature: jax.Array | float,
    options: LossOptions = LossOptions(),
    score_sharding: Any = None,
) -> tuple[jax.Array, Metrics]:
    """The contrastive loss of the global batch.

    Args:
      query_emb: [B, D] query embeddings.
      passage_emb: [B, G, D]; `[:, 0]` is each pair's positive, `[:, 1:]` its hard negatives.
      unit_id: [B] parallel-unit index per pair; other pairs with the same unit are never negatives.
      temperature: τ (a scalar; pass `exp(log_tau)` for a learnable one, gradients flow through it).
      options: the variant (module docstring).
      score_sharding: optional sharding constraint for the score matrices (rows = this batch's pairs).

    Returns:
      (loss, metrics) as float32 scalars; metrics hold loss, loss_q2p, [loss_p2q], [loss_vrn], accuracy (top-1
      over the query's passage columns), pos_sim, neg_sim (mean raw similarity to the negatives), temperature.
    """
    q = query_emb.astype(jnp.float32)
    p = passage_emb.astype(jnp.float32)
    _check_shapes(q, p)
    n, g, d = p.shape
    unit_id = jnp.asarray(unit_id)
    temperature = jnp.asarray(temperature, jnp.float32)
    rows = _rows(q, p[:, 0], p.reshape(n * g, d), q, unit_id, unit_id, 0, group_size=g, temperature=temperature,
                 opts=options, score_sharding=score_sharding)
    return _combine({k: v.sum() for k, v in rows.items()}, n, options, temperature)


def sharded_contrastive_loss(
    query_emb: jax.Array,
    passage_emb: jax.Array,
    unit_id: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str],
    temperature: jax.Array | float,
    options: LossOptions = LossOptions(),
) -> tuple[jax.Array, Metrics]:
    """`contrastive_loss` written out under `jax.shard_map`: each device keeps its pairs and all-gathers the
    passage embeddings and the queries over `batch_axes`.

    Same arguments and results as `contrastive_loss`; the inputs are sharded on their batch axis over
    `batch_axes` of `mesh`. Its gradients equal the single-device ones (the all_gather transposes to a
    reduce-scatter), which tests/test_step.py and tests/test_losses.py check.
    """
    _check_shapes(query_emb, passage_emb)
    axes = tuple(batch_axes)
    temperature = jnp.asarray(temperature, jnp.float32)
    n, g, d = passage_emb.shape

    def local(q, p, unit, tau):
        q = q.astype(jnp.float32)
        p = p.astype(jnp.float32)
        gather = lambda x: jax.lax.all_gather(x, axes, axis=0, tiled=True)
        rows = _rows(q, p[:, 0], gather(p).reshape(n * g, d), gather(q), unit, gather(unit),
                     jax.lax.axis_index(axes) * q.shape[0], group_size=g, temperature=tau, opts=options)
        return {k: jax.lax.psum(v.sum(), axes) for k, v in rows.items()}

    batch = P(axes)
    sums = jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, batch, P()), out_specs=P(),
                         check_vma=False)(query_emb, passage_emb, unit_id, temperature)
    return _combine(sums, n, options, temperature)


# ------------------------------------------------------------------------------------------- the family record


def _defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.symmetric = False  # add the passage -> query direction
    # True: InfoNCE with in-batch negatives (every passage of the batch). False: Eq. 1 of arXiv 2408.10536 as
    # written (own positive + the hard negatives of every pair; other pairs' positives left out).
    s.in_batch_positives = True
    s.within_view = False  # arXiv 2506.09781's query-query (and, symmetric, passage-passage) negatives
    # VRN (arXiv 2506.09781): vrn_weight * mean over negative pairs of |cos - delta|^vrn_power (0: off), with
    # delta = -1/(k-1) for k = vrn_instances training instances, or vrn_delta when vrn_instances = 0.
    s.vrn_weight = 0.0
    s.vrn_power = 2.0
    s.vrn_instances = 0
    s.vrn_delta = 0.0
    return s


def _validate(s: ml_collections.ConfigDict, ctx: LossContext) -> None:
    if s.vrn_weight < 0:
        raise ctx.fail("vrn_weight", f"{s.vrn_weight} must be >= 0 (0: no VRN term)")
    if s.vrn_power <= 0:
        raise ctx.fail("vrn_power", f"{s.vrn_power} must be positive")
    if s.vrn_instances != 0 and s.vrn_instances < 2:
        raise ctx.fail("vrn_instances", f"{s.vrn_instances} must be 0 (use vrn_delta) or >= 2 (delta = -1/(k-1))")


def _options(s: ml_collections.ConfigDict, loss: Any) -> LossOptions:
    """The section -> the variant (δ = −1/(k−1) when vrn_instances = k, else vrn_delta)."""
    delta = vrn_delta(int(s.vrn_instances)) if s.vrn_instances else float(s.vrn_delta)
    return LossOptions(symmetric=bool(s.symmetric), in_batch_positives=bool(s.in_batch_positives),
                       within_view=bool(s.within_view), vrn_weight=float(s.vrn_weight), vrn_delta=delta,
                       vrn_power=float(s.vrn_power))


def _build(options: LossOptions, setup: LossSetup) -> Term:
    """The term on `setup`'s mesh: passages gathered by a row-sharding constraint on the scores, or explicitly
    under shard_map (`setup.gather`); without a mesh, the plain single-device loss."""

    def term(emb: Any, fields: Any, temperature: Any) -> tuple[jax.Array, Metrics]:
        q, p, unit = emb["query"], emb["passage"], fields["unit_id"]
        if setup.mesh is not None and setup.gather == "shard_map":
            return sharded_contrastive_loss(q, p, unit, mesh=setup.mesh, batch_axes=setup.batch_axes,
                                            temperature=temperature, options=options)
        # Queries stay where their rows are; XLA gathers the passage embeddings to every device.
        sharding = NamedSharding(setup.mesh, P(setup.batch_axes, None)) if setup.mesh is not None else None
        return contrastive_loss(q, p, unit, temperature=temperature, options=options, score_sharding=sharding)

    return term


def _describe(o: LossOptions) -> str:
    negatives = (", in-batch negatives" if o.in_batch_positives
                 else ", Eq. 1 of 2408.10536 (every pair's hard negatives)")
    return ("contrastive (InfoNCE)" + (", symmetric" if o.symmetric else "") + negatives
            + (", within-view negatives" if o.within_view else "")
            + (f", VRN λ={o.vrn_weight:g} p={o.vrn_power:g} δ={o.vrn_delta:.4g}" if o.vrn_weight else ""))


LOSS = LossFamily(
    "contrastive", _defaults, _options, _build, _describe, _validate, embeddings=("query", "passage"),
    fields=("unit_id",),
    # config.loss.<field> before the loss registry (configs, checkpoints and the study's run files use them).
    aliases=("symmetric", "in_batch_positives", "within_view", "vrn_weight", "vrn_power", "vrn_instances",
             "vrn_delta"))
