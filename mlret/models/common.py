"""Pieces the encoder families share: token positions of padded and packed rows, attention masks, rotary
position embeddings (HF's `rotate_half` convention), RMSNorm, and a projection with a per-head kernel layout.

Positions are always counted within a text: from its first real token on a padded row (whichever side the
padding is on) and from its segment's first token on a packed row, so a text's states do not depend on how it
was batched.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.spmd import get_logical_axis_rules

from mlret import parallel

# HF initialises with N(0, initializer_range=0.02); only used when a model is built without weights.
init = nnx.initializers.normal(0.02)


def axes(*names: str | None) -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of a parameter (the `out_sharding` metadata `mlret.parallel` maps to mesh axes)."""
    return {"out_sharding": names}


# The logical axes of the hidden states [B, T, H] between blocks: the batch split as the data (`batch` rule: data x
# fsdp by default), the length and the hidden axis whole on every device.
HIDDEN_AXES = ("batch", None, None)


def constrain(x: jax.Array, names: Sequence[str | None] = HIDDEN_AXES) -> jax.Array:
    """`x` pinned to the sharding that its axes' logical `names` get under the rules of `nnx.logical_axis_rules`
    (mapped as the parameters' are: `mlret.parallel.logical_to_spec`) on the mesh in context
    (`jax.sharding.use_abstract_mesh`); `mlret.parallel.activation_sharding` sets both while a step is traced.
    Without that context (one device, a model called on its own) `x` is returned as it is; a name the rules do not
    map leaves its axis whole (flax's `with_logical_constraint` does the same).

    The hidden states are pinned after the embeddings and after every block: with `mesh.fsdp` > 1 the weights are
    split over fsdp along `embed`, and without the pin XLA split the activations the same way and gathered them
    around every matmul; pinned, each device keeps its own rows whole and XLA gathers the weights instead (FSDP)."""
    rules = get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    known = {name for name, _ in rules}
    spec = parallel.logical_to_spec(tuple(n if n in known else None for n in names), rules, mesh, x.shape,
                                    what="activation")
    return jax.lax.with_sharding_constraint(x, spec)


def lookup(embed: nnx.Embed, ids: jax.Array) -> jax.Array:
    """`embed(ids)` (nnx.Embed's rows of its table in its compute dtype) with the table's `embed` axis whole
    (`constrain`): with mesh.fsdp > 1 the table is gathered, as every other weight, and each device looks up its
    own rows; looked up from the split table, the rows came out split along the hidden axis and XLA re-sharded
    them (an all-to-all forward, an all-gather of the whole batch's gradients backward).

    Under `value_and_grad_deferring_lookups`, a table with more rows than `ids` has ids (a vocabulary) is looked
    up outside the gradient and the rows' gradient is scattered into the table's after every other gradient."""
    value = embed.embedding[...]
    (table,) = embed.promote_dtype((value,), dtype=embed.dtype, inexact=False)
    table = constrain(table, ("vocab", None))
    deferred = _DEFERRED.get()
    if deferred is None or table.shape[0] <= ids.size:
        return jnp.take(table, ids, axis=0)
    return deferred.take(value, table, ids)


class _DeferredLookups:
    """The large-table lookups of one trace, in order: their tables (the parameter leaves, by identity) and ids.
    Given `taps` (zeros, one per lookup), each lookup returns its rows from the table without a gradient plus its
    tap, so the tap's gradient is the rows' gradient."""

    def __init__(self, taps: Sequence[jax.Array] | None) -> None:
        self.taps = taps
        self.tables: list[jax.Array] = []  # the parameter leaves
        self.looked_up: list[jax.Array] = []  # the tables as looked up (in the compute dtype)
        self.ids: list[jax.Array] = []

    def take(self, value: jax.Array, table: jax.Array, ids: jax.Array) -> jax.Array:
        rows = jnp.take(jax.lax.stop_gradient(table), ids, axis=0)
        i = len(self.tables)
        self.tables.append(value)
        self.looked_up.append(table)
        self.ids.append(ids)
        return rows if self.taps is None else rows + self.taps[i]


_DEFERRED: contextvars.ContextVar[_DeferredLookups | None] = contextvars.ContextVar("mlret_deferred_lookups",
                                                                                     default=None)


def deferred_lookups(fn: Callable[..., Any], params: Any, *args: Any) -> list[jax.ShapeDtypeStruct]:
    """The rows [*ids.shape, D] of each lookup in `fn(params, *args)` whose gradient
    `value_and_grad_deferring_lookups` defers (tables with more rows than the lookup has ids), in call order."""
    probe = _DeferredLookups(None)
    token = _DEFERRED.set(probe)
    try:
        jax.eval_shape(fn, params, *args)
    finally:
        _DEFERRED.reset(token)
    return [jax.ShapeDtypeStruct(ids.shape + table.shape[-1:], table.dtype)
            for table, ids in zip(probe.looked_up, probe.ids)]


def value_and_grad_deferring_lookups(fn: Callable[..., tuple[jax.Array, Any]], params: Any,
                                     *args: Any) -> tuple[tuple[jax.Array, Any], Any]:
    """`jax.value_and_grad(fn, has_aux=True)(params, *args)`, with the gradient of every vocabulary-sized
    embedding table (`lookup`) scattered from its looked-up rows after all the other gradients are computed.

    Why: differentiated as it is, a lookup's gradient is a scatter into a zero table as large as the vocabulary
    (multilingual-e5-small: 250,037 x 384, 0.36 GiB), and XLA schedules it inside the backward pass, while the
    forward pass's residuals are still held for the layers' weight gradients: the step's peak holds both
    (docs/benchmarks.md, "Fourth session (issue 30)"). Here each lookup adds a zero tap to rows taken without a
    gradient; the taps' gradients (the rows' gradients, [tokens, D]) are scattered into the table's once all the
    other gradients are computed. The gradients are the same sums: an exact
    zero is added to each row, and the scatter adds the same rows in the same order as the lookup's transpose.
    `fn` is traced twice: once for the lookups' shapes (`deferred_lookups`), once differentiated."""
    shapes = deferred_lookups(fn, params, *args)
    if not shapes:
        return jax.value_and_grad(fn, has_aux=True)(params, *args)
    taps = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    where: list[int] = []  # the params leaf of each lookup's table (static, found while tracing)

    def tapped(params: Any, taps: list[jax.Array]) -> tuple[jax.Array, Any]:
        where.clear()
        deferred = _DeferredLookups(taps)
        token = _DEFERRED.set(deferred)
        try:
            loss, aux = fn(params, *args)
        finally:
            _DEFERRED.reset(token)
        leaves = jax.tree.leaves(params)
        for table in deferred.tables:
            found = [i for i, leaf in enumerate(leaves) if leaf is table]
            if len(found) != 1:
                raise ValueError("value_and_grad_deferring_lookups: an embedding table looked up in `fn` is not one "
                                 "of the differentiated parameters' leaves")
            where.append(found[0])
        return loss, (aux, deferred.ids)

    (loss, (aux, ids)), (grads, tap_grads) = jax.value_and_grad(tapped, argnums=(0, 1), has_aux=True)(params, taps)
    leaves, treedef = jax.tree.flatten(grads)
    # The scatters wait for every other gradient through a data dependency: the sum of their squares, which
    # turns the rows' gradients to NaN only when another gradient is already NaN (a step the train step skips).
    # XLA:CPU drops `lax.optimization_barrier` before it schedules, so a barrier does not order them. The tables'
    # own gradients (zero, unless a table is also used otherwise) are scattered into, after the wait.
    others = sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for i, leaf in enumerate(leaves) if i not in where)
    for i, rows_ids, rows_grad in zip(where, ids, tap_grads):
        d = rows_grad.shape[-1]
        rows_grad = jnp.where(jnp.isnan(others), jnp.nan, rows_grad.reshape(-1, d)).astype(leaves[i].dtype)
        leaves[i] = leaves[i].at[rows_ids.reshape(-1)].add(rows_grad)
    return (loss, aux), jax.tree.unflatten(treedef, leaves)


def _exact_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """HF's "gelu", the exact (erf) form (`jax.nn.gelu(x, approximate=False)`; the tanh form differs by ~1e-3),
    whose backward pass recomputes its derivative from `x` instead of keeping the forward pass's factors.

    Differentiated as it is, the forward pass keeps erfc(-x/sqrt 2) and its derivative's factors for the backward
    pass: with the layer's input to the GELU and its output (which the next matmul's weight gradient needs), four
    [tokens, intermediate] tensors per layer, the largest part of the step's residuals (docs/benchmarks.md, "Fifth
    session (issue 30)"). Here the forward pass keeps `x` only; the backward pass takes the same vjp from it, so
    the gradient is computed by the same operations. The recomputation reads the incoming gradient (`x + 0 * g`:
    `x` itself, as g is finite; NaN where it is not), so XLA can neither merge it with the forward pass's
    identical operations nor move it ahead of the backward pass, where both would keep the factors alive again."""
    return _exact_gelu(x)


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _exact_gelu(x), x


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    _, vjp = jax.vjp(_exact_gelu, x + 0 * g)
    return vjp(g)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] index of each token within its segment (a segment starts where the id differs from the previous
    token's); padding (-1) is counted like a segment, and never used."""
    t = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def padded_segments(mask: jax.Array) -> jax.Array:
    """Segment ids of padded rows: 0 on real tokens, -1 on padding (one text per row, padding on either side)."""
    return jnp.where(mask > 0, 0, -1).astype(jnp.int32)


def text_positions(mask: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Position of each real token within its text: packed rows restart at each segment, padded rows count real
    tokens from 0 (so left padding shifts nothing). Padding gets 0."""
    if segment_ids is not None:
        return jnp.where(segment_ids >= 0, segment_positions(segment_ids), 0)
    real = (mask > 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0) * real


def attention_mask(segment_ids: jax.Array, *, causal: bool = False, window: int | None = None) -> jax.Array:
    """Boolean [B, 1, T, S]: a token attends to the keys of its own segment (padding, -1, to padding, so no row is
    empty), only to earlier ones when `causal`, and only within distance `window` (|q - k| <= window) when given.
    Segments are contiguous, so row distance is distance within the text."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    t = jnp.arange(segment_ids.shape[-1])
    if causal:
        same &= (t[None, :] <= t[:, None])[None]
    if window is not None:
        same &= (jnp.abs(t[:, None] - t[None, :]) <= window)[None]
    return same[:, None]


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of x [B, T, N, D] at `positions` [B, T], as HF's default rope: inverse frequencies
    theta^(-2i/D), cos/sin computed in float32 over cat(freqs, freqs), and x*cos + rotate_half(x)*sin."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., d // 2:], x32[..., :d // 2]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nnx.Module):
    """HF's RMSNorm (Llama / Qwen): x / sqrt(mean(x^2) + eps) in float32, then times the scale."""

    def __init__(self, size: int, *, eps: float, dtype: jnp.dtype) -> None:
        self.scale = nnx.Param(jnp.ones((size,), jnp.float32), **axes("norm"))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale.get_value().astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


class Projection(nnx.Module):
    """x [..., n_in] -> [..., *out_shape] with kernel [n_in, *out_shape] (or, `inputs` > 1, x [..., *in_shape] ->
    [..., n_out] with kernel [*in_shape, n_out]): the per-head layouts ([embed, heads, head_dim], [heads, head_dim,
    embed], fused [embed, 3, heads, head_dim]) whose axes shard by head."""

    def __init__(self, shape: Sequence[int], kernel_axes: Sequence[str | None], *, inputs: int = 1,
                 bias_axes: Sequence[str | None] | None = None, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        shape = tuple(int(n) for n in shape)
        fan_in = math.prod(shape[:inputs])
        kernel = init(rngs.params(), (fan_in, math.prod(shape[inputs:])), jnp.float32).reshape(shape)
        self.kernel = nnx.Param(kernel, **axes(*kernel_axes))
        self.bias = (nnx.Param(jnp.zeros(shape[inputs:], jnp.float32), **axes(*bias_axes))
                     if bias_axes is not None else None)
        self.inputs, self.dtype = inputs, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel.get_value().astype(self.dtype)
        n = self.inputs
        y = jax.lax.dot_general(x.astype(self.dtype), kernel,
                                ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.dtype)
        return y
