"""Gradient caching: contrastive-loss gradients of a large global batch with the memory of one chunk.

The contrastive loss couples every pair of the global batch (each query is scored against every passage), so the
batch cannot simply be split into micro-batches whose gradients are summed. GradCache (Gao et al. 2021;
luyug/GradCache `cachex/functional.py`, Tevatron's JAX trainer) splits the *encoder* work instead, in three
phases:

  1. encode the whole batch chunk by chunk under `lax.scan`, outside any gradient, and keep only the
     embeddings ([B, D] and [B, G, D]: tiny next to the activations);
  2. take the loss and its gradient with respect to the embeddings (and the loss's own parameters, such as a
     learnable temperature) on the full embedding matrices: the loss sees the whole global batch;
  3. encode again chunk by chunk under `lax.scan` (the rematerialisation) and pull each chunk's embedding
     gradient back through the encoder with a vjp, summing the parameter gradients in the scan carry.

Peak activation memory is that of one chunk's forward and backward pass; the price is one extra forward pass.
Loss and gradients equal the plain step's up to float32 summation order (tests/test_gradcache.py).

On a mesh, the chunks are cut along each device's own rows: with the batch split into `dp` contiguous blocks
(one per data-parallel shard), chunk k holds rows k*c/dp .. (k+1)*c/dp - 1 of *every* block, so each device
encodes only rows it already holds and no token ids move between devices; only the embeddings are gathered, by
the loss, as in the plain step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Batch = Mapping[str, jax.Array]
# embed_fn(params, chunk_of_batch) -> a pytree of embeddings whose leaves have the chunk's rows as leading axis.
EmbedFn = Callable[[Any, Batch], Any]
# loss_fn(params, embeddings of the whole batch, the whole batch) -> (loss, aux).
LossFn = Callable[[Any, Any, Batch], tuple[jax.Array, Any]]


def to_chunks(x: jax.Array, chunks: int, data_parallel: int) -> jax.Array:
    """[B, ...] -> [chunks, B/chunks, ...], chunk k taking rows k*c/dp.. of each of the `dp` contiguous blocks.

    The reshapes split and merge axes only inside a device's block, so under a batch sharding they are local.
    """
    b = x.shape[0]
    per = b // (chunks * data_parallel)  # rows per device per chunk
    y = x.reshape(data_parallel, chunks, per, *x.shape[1:])
    return jnp.swapaxes(y, 0, 1).reshape(chunks, data_parallel * per, *x.shape[1:])


def from_chunks(y: jax.Array, data_parallel: int) -> jax.Array:
    """The inverse of `to_chunks`: [chunks, c, ...] -> [chunks*c, ...] in the original row order."""
    chunks, c = y.shape[:2]
    per = c // data_parallel
    z = y.reshape(chunks, data_parallel, per, *y.shape[2:])
    return jnp.swapaxes(z, 0, 1).reshape(chunks * c, *y.shape[2:])


def value_and_grad(embed_fn: EmbedFn, loss_fn: LossFn, params: Any, batch: Batch, *, chunk: int,
                   embed_fields: Sequence[str], mesh: Mesh | None = None, batch_axes: Sequence[str] = (),
                   grad_shardings: Any = None, pairs: int | None = None) -> tuple[tuple[jax.Array, Any], Any]:
    """((loss, aux), d loss / d params) of `loss_fn(params, embed_fn(params, batch), batch)`, by gradient caching.

    Args:
      embed_fn: encodes a chunk of the batch (the `embed_fields` of `chunk` rows) to a pytree of embeddings.
      loss_fn: the loss of the whole batch's embeddings; may use `params` itself (a learnable temperature) and
        any field of `batch`. Its gradient with respect to `params` is added to the encoder's.
      params: the differentiated parameters (any pytree).
      batch: global arrays with the pairs on the leading axis.
      chunk: pairs encoded at once (over all devices); a multiple of the data-parallel size dividing the batch
        (`mlret.config.validate` with `devices=` checks `config.train.grad_cache_chunk` so).
      embed_fields: the batch fields `embed_fn` reads (token ids and masks); only these are chunked.
      mesh, batch_axes: the mesh and the mesh axes the batch is split over; without a mesh, no sharding
        constraints are added (one device).
      grad_shardings: shardings of the parameter gradients (the parameters' own), so the accumulator in the scan
        carry stays sharded like the parameters (FSDP) rather than replicated.
      pairs: the pairs of the global batch, which `chunk` counts (default: the rows of the first embed field);
        packed fields (mlret.data.packing) have their own row counts, laid out so that each device's block of
        rows splits into the same number of chunks.

    Must be called inside `jax.jit` (or eagerly); it is not itself differentiable (it *is* the derivative).
    """
    axes = tuple(batch_axes)
    dp = 1
    if mesh is not None:
        for a in axes:
            dp *= mesh.shape[a]
    k = (pairs if pairs is not None else batch[embed_fields[0]].shape[0]) // chunk

    def constrain(x: Any, spec: P) -> Any:
        if mesh is None:
            return x
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec)), x)

    rows_spec = P(axes) if axes else P()
    chunked_spec = P(None, axes) if axes else P()
    xs = {f: constrain(to_chunks(batch[f], k, dp), chunked_spec) for f in embed_fields}

    # Phase 1: embeddings of every chunk, no activations kept (nothing here is differentiated).
    def encode(_, x):
        return None, constrain(embed_fn(params, constrain(x, rows_spec)), rows_spec)

    _, emb_chunks = jax.lax.scan(encode, None, xs)
    emb = constrain(jax.tree.map(lambda y: from_chunks(y, dp), emb_chunks), rows_spec)

    # Phase 2: loss and gradients on the full embedding matrices (the gathered global batch).
    (loss, aux), (loss_param_grads, emb_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, emb, batch)
    emb_grad_chunks = constrain(jax.tree.map(lambda g: to_chunks(g, k, dp), emb_grads), chunked_spec)

    # Phase 3: re-encode each chunk and pull its embedding gradients back to the parameters.
    def shard_like_params(tree: Any) -> Any:
        if grad_shardings is None:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, grad_shardings)

    def backward(acc, inputs):
        x, g = inputs
        x = constrain(x, rows_spec)
        _, pullback = jax.vjp(lambda p: embed_fn(p, x), params)
        (grads,) = pullback(constrain(g, rows_spec))
        return shard_like_params(jax.tree.map(jnp.add, acc, grads)), None

    acc0 = shard_like_params(jax.tree.map(jnp.zeros_like, loss_param_grads))
    acc, _ = jax.lax.scan(backward, acc0, (xs, emb_grad_chunks))
    grads = shard_like_params(jax.tree.map(jnp.add, acc, loss_param_grads))
    return (loss, aux), grads
