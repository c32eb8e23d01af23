"""Contrastive (InfoNCE) losses for dual encoders: pure functions of embeddings.

The loss is taken over the **global** batch (DESIGN.md §4, t5x_retrieval's in-batch softmax): each query is
scored against every passage of the batch, the passages laid out `[B, G]` (index 0 of pair `i` is its positive,
1..G-1 its hard negatives) and flattened to `B*G` columns, so the label of query `i` is column `i*G`. Passages of
*other* pairs that share the query's `unit_id` (translations of the same QA item, or the same item drawn twice)
are not negatives: their logits are masked out, positives and hard negatives alike.

Nothing here knows about models, data or meshes. The only distribution hook is `score_sharding`: the train step
passes a sharding that keeps the `[B, B*G]` score matrix split on its query (row) axis, so each device holds
`B/devices x B*G` scores and only passage embeddings travel (`sharded_contrastive_loss` does the same with an
explicit `all_gather` under `shard_map`). Everything is computed in float32 whatever the encoder's compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Metrics = dict[str, jax.Array]


def _query_to_passage(
    q: jax.Array,
    p_flat: jax.Array,
    unit_q: jax.Array,
    unit_p: jax.Array,
    row_offset: jax.Array | int,
    *,
    group_size: int,
    temperature: jax.Array | float,
    in_batch_positives: bool,
    score_sharding: Any = None,
) -> dict[str, jax.Array]:
    """Per-query terms for the rows `row_offset .. row_offset+b` of the global score matrix.

    q: [b, D] queries; p_flat: [B*G, D] every passage of the global batch; unit_q: [b]; unit_p: [B].
    Returns per-row arrays (summed by the callers, so the jit and shard_map paths share this code).
    """
    b = q.shape[0]
    n_cols = p_flat.shape[0]
    sim = q @ p_flat.T  # [b, B*G] raw similarities (cosines when the encoder normalises)
    if score_sharding is not None:
        # Rows stay on the devices that own the queries: per-device memory b x B*G, never (B*G)^2.
        sim = jax.lax.with_sharding_constraint(sim, score_sharding)
    rows = row_offset + jnp.arange(b)  # global pair index of each query
    col_pair = jnp.arange(n_cols) // group_size  # pair each column's passage belongs to
    own = col_pair[None, :] == rows[:, None]  # own positive + own hard negatives
    if in_batch_positives:
        same_unit = unit_p[col_pair][None, :] == unit_q[:, None]
        valid = own | ~same_unit
    else:
        # The paper's Eq. 1 as written: the own positive against the own hard negatives only.
        valid = own
    label_col = rows * group_size
    logits = sim / temperature
    masked = jnp.where(valid, logits, -jnp.inf)
    label_logit = logits[jnp.arange(b), label_col]
    nll = jax.nn.logsumexp(masked, axis=1) - label_logit

    negative = valid & (jnp.arange(n_cols)[None, :] != label_col[:, None])
    n_neg = negative.sum(axis=1).astype(jnp.float32)
    neg_sim = jnp.where(negative, sim, 0.0)
    neg_mean = neg_sim.sum(axis=1) / jnp.maximum(n_neg, 1.0)
    # Population variance of each query's negative similarities (arXiv 2506.09781 penalises its spread).
    neg_var = jnp.where(negative, (sim - neg_mean[:, None]) ** 2, 0.0).sum(axis=1) / jnp.maximum(n_neg, 1.0)
    correct = jnp.argmax(masked, axis=1) == label_col
    return {
        "nll": nll,
        "neg_var": neg_var,
        "correct": correct.astype(jnp.float32),
        "pos_sim": sim[jnp.arange(b), label_col],
        "neg_sim": neg_mean,
        "n_neg": n_neg,
    }


def _passage_to_query(
    pos: jax.Array,
    q_all: jax.Array,
    unit_p: jax.Array,
    unit_q: jax.Array,
    row_offset: jax.Array | int,
    *,
    temperature: jax.Array | float,
) -> jax.Array:
    """Per-positive NLL of the passage -> query direction: positive `i` against every query of the batch.

    Queries of other pairs with the same unit are masked (they are the positive's own translations). This
    direction always uses the in-batch queries: with only its own query it would be a constant.
    """
    b = pos.shape[0]
    rows = row_offset + jnp.arange(b)
    sim = pos @ q_all.T  # [b, B]
    cols = jnp.arange(q_all.shape[0])
    valid = (cols[None, :] == rows[:, None]) | (unit_q[None, :] != unit_p[:, None])
    logits = sim / temperature
    masked = jnp.where(valid, logits, -jnp.inf)
    return jax.nn.logsumexp(masked, axis=1) - logits[jnp.arange(b), rows]


def _combine(q2p: dict[str, jax.Array], p2q_nll: jax.Array | None, n: int | jax.Array, *,
             variance_penalty: float, temperature: jax.Array | float) -> tuple[jax.Array, Metrics]:
    """Sums of per-row terms -> (loss, metrics); `n` is the global batch size."""
    q2p_loss = q2p["nll"] / n
    loss = q2p_loss
    metrics: Metrics = {"loss_q2p": q2p_loss}
    if p2q_nll is not None:
        p2q_loss = p2q_nll / n
        loss = 0.5 * (q2p_loss + p2q_loss)
        metrics["loss_p2q"] = p2q_loss
    neg_var = q2p["neg_var"] / n
    if variance_penalty:
        loss = loss + variance_penalty * neg_var
    metrics.update(
        loss=loss,
        accuracy=q2p["correct"] / n,
        pos_sim=q2p["pos_sim"] / n,
        neg_sim=q2p["neg_sim"] / n,
        neg_sim_var=neg_var,
        temperature=jnp.asarray(temperature, jnp.float32),
    )
    return loss, metrics


def contrastive_loss(
    query_emb: jax.Array,
    passage_emb: jax.Array,
    unit_id: jax.Array,
    *,
    temperature: jax.Array | float,
    symmetric: bool = False,
    in_batch_positives: bool = True,
    variance_penalty: float = 0.0,
    score_sharding: Any = None,
) -> tuple[jax.Array, Metrics]:
    """InfoNCE over the global batch.

    Args:
      query_emb: [B, D] query embeddings.
      passage_emb: [B, G, D]; `[:, 0]` is each pair's positive, `[:, 1:]` its hard negatives.
      unit_id: [B] parallel-unit index per pair; passages of other pairs with the same unit are masked.
      temperature: τ (a scalar; pass `exp(log_tau)` for a learnable one, gradients flow through it).
      symmetric: average with the passage -> query loss over the positives.
      in_batch_positives: False scores each query against its own positive and hard negatives only.
      variance_penalty: weight of the mean per-query variance of the negative similarities (raw q·p).
      score_sharding: optional sharding constraint for the [B, B*G] score matrix (rows = queries).

    Returns:
      (loss, metrics) as float32 scalars; metrics hold loss, loss_q2p, [loss_p2q], accuracy (top-1 over the
      unmasked columns), pos_sim, neg_sim, neg_sim_var, temperature.
    """
    q = query_emb.astype(jnp.float32)
    p = passage_emb.astype(jnp.float32)
    if p.ndim != 3 or q.ndim != 2 or p.shape[0] != q.shape[0] or p.shape[2] != q.shape[1]:
        raise ValueError(f"contrastive_loss: query_emb {q.shape} must be [B, D] and passage_emb {p.shape} "
                         "[B, G, D] with the same B and D")
    n, g, d = p.shape
    unit_id = jnp.asarray(unit_id)
    temperature = jnp.asarray(temperature, jnp.float32)
    q2p = _query_to_passage(q, p.reshape(n * g, d), unit_id, unit_id, 0, group_size=g,
                            temperature=temperature, in_batch_positives=in_batch_positives,
                            score_sharding=score_sharding)
    q2p = {k: v.sum() for k, v in q2p.items()}
    p2q = None
    if symmetric:
        p2q = _passage_to_query(p[:, 0], q, unit_id, unit_id, 0, temperature=temperature).sum()
    return _combine(q2p, p2q, n, variance_penalty=variance_penalty, temperature=temperature)


def sharded_contrastive_loss(
    query_emb: jax.Array,
    passage_emb: jax.Array,
    unit_id: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str],
    temperature: jax.Array | float,
    symmetric: bool = False,
    in_batch_positives: bool = True,
    variance_penalty: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """`contrastive_loss` written out under `jax.shard_map`: each device keeps its queries and all-gathers
    the passage embeddings (and, when symmetric, the queries) over `batch_axes`.

    Same arguments and results as `contrastive_loss`; the inputs are sharded on their batch axis over
    `batch_axes` of `mesh`. Its gradients equal the single-device ones (the all_gather transposes to a
    reduce-scatter), which tests/test_step*.py checks.
    """
    axes = tuple(batch_axes)
    temperature = jnp.asarray(temperature, jnp.float32)
    n, g, d = passage_emb.shape

    def local(q, p, unit, tau):
        q = q.astype(jnp.float32)
        p = p.astype(jnp.float32)
        b = q.shape[0]
        row_offset = jax.lax.axis_index(axes) * b
        p_all = jax.lax.all_gather(p, axes, axis=0, tiled=True)  # [B, G, D]
        unit_all = jax.lax.all_gather(unit, axes, axis=0, tiled=True)
        q2p = _query_to_passage(q, p_all.reshape(n * g, d), unit, unit_all, row_offset, group_size=g,
                                temperature=tau, in_batch_positives=in_batch_positives)
        sums = {k: jax.lax.psum(v.sum(), axes) for k, v in q2p.items()}
        if symmetric:
            q_all = jax.lax.all_gather(q, axes, axis=0, tiled=True)
            sums["p2q"] = jax.lax.psum(
                _passage_to_query(p[:, 0], q_all, unit, unit_all, row_offset, temperature=tau).sum(), axes)
        return sums

    batch = P(axes)
    sums = jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, batch, P()), out_specs=P(),
                         check_vma=False)(query_emb, passage_emb, unit_id, temperature)
    p2q = sums.pop("p2q", None)
    return _combine(sums, p2q, n, variance_penalty=variance_penalty, temperature=temperature)
