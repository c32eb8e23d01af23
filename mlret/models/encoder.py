"""The BERT family's Flax NNX transformer encoder (bert, xlm-roberta, roberta), numerically equal to Hugging Face's.

Post-LN blocks, exact GELU, absolute (optionally RoBERTa padding-offset) positions, token types and the
optional pooler, as in `transformers.BertModel` / `XLMRobertaModel`. Parameters are float32 and carry logical
axis names (`out_sharding` metadata) so that `mlret.parallel` can map them to mesh axes with
`nnx.get_partition_spec` under `nnx.logical_axis_rules`; activations run in `dtype` (float32 or bfloat16) and the
returned hidden states are float32. Dropout is not modelled: the encoder is deterministic (see docs/architecture.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlret.models.common import constrain, gelu, lookup
from mlret.models.encoder_config import EncoderConfig

# Every logical axis name a parameter can carry; sharding rules must map each of them (None = replicated).
LOGICAL_AXIS_NAMES = ("vocab", "embed", "heads", "kv", "mlp", "pos", "type", "norm")

# jax.nn.dot_product_attention's implementations: auto (jax picks; XLA today), xla, cudnn (fused, GPU, bf16/fp16).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")

# HF initialises with N(0, initializer_range=0.02); only used when a model is built without weights.
_init = nnx.initializers.normal(0.02)


def _axes(*names: str) -> dict[str, tuple[str, ...]]:
    return {"out_sharding": names}


def _dense(rngs: nnx.Rngs, n_in: int, n_out: int, kernel_axes: tuple[str, str], bias_axis: str,
           dtype: jnp.dtype) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=jnp.float32, kernel_init=_init, rngs=rngs,
                      kernel_metadata=_axes(*kernel_axes), bias_metadata=_axes(bias_axis))


def _layer_norm(rngs: nnx.Rngs, cfg: EncoderConfig, dtype: jnp.dtype) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] as torch computes it; E[x^2]-mean^2 loses digits in float32.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs, scale_metadata=_axes("norm"),
                         bias_metadata=_axes("norm"))


class Embeddings(nnx.Module):
    """word + position (+ token type) embeddings, then LayerNorm."""

    def __init__(self, cfg: EncoderConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        embed = lambda n, axis: nnx.Embed(n, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                          embedding_init=_init, rngs=rngs,
                                          embedding_metadata=_axes(axis, "embed"))
        self.word = embed(cfg.vocab_size, "vocab")
        self.position = embed(cfg.max_position_embeddings, "pos")
        self.token_type = embed(cfg.type_vocab_size, "type") if cfg.type_vocab_size > 0 else None
        self.norm = _layer_norm(rngs, cfg, dtype)

    def __call__(self, ids: jax.Array, token_type_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        h = lookup(self.word, ids) + lookup(self.position, self.positions(ids, segment_ids))
        if self.token_type is not None:
            # HF adds token_type_embeddings[0] when no token types are given.
            types = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
            h = h + lookup(self.token_type, types)
        return self.norm(h)


    def positions(self, ids: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """Position ids [B, T]: 0, 1, ... per row, or per segment of a packed row (restarting where the segment id
        changes); with RoBERTa offsets, real tokens count from pad_token_id + 1 and padding gets pad_token_id."""
        _, length = ids.shape
        t = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), ids.shape)
        if segment_ids is None:
            if not self.cfg.roberta_positions:
                return t
            # HF's create_position_ids_from_input_ids: count non-pad tokens from pad_token_id + 1, and give
            # padding the pad position. Derived from the ids (not the mask) exactly as the reference does.
            not_pad = (ids != self.cfg.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(not_pad, axis=1) * not_pad + self.cfg.pad_token_id
        # A segment starts where its id differs from the previous token's; its tokens count from that start.
        starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                  segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        within = t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
        if not self.cfg.roberta_positions:
            return within
        return jnp.where(segment_ids >= 0, within + self.cfg.pad_token_id + 1, self.cfg.pad_token_id)


class SelfAttention(nnx.Module):
    """Multi-head self-attention; kernels are [embed, heads*head_dim] so heads shard along the tensor axis."""

    def __init__(self, cfg: EncoderConfig, *, dtype: jnp.dtype, attention: str, rngs: nnx.Rngs) -> None:
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.implementation = None if attention == "auto" else attention
        self.query = _dense(rngs, h, h, ("embed", "heads"), "heads", dtype)
        self.key = _dense(rngs, h, h, ("embed", "heads"), "heads", dtype)
        self.value = _dense(rngs, h, h, ("embed", "heads"), "heads", dtype)
        self.output = _dense(rngs, h, h, ("heads", "embed"), "norm", dtype)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        # key_mask [B, 1, 1, S] (padded keys get no weight, so padding cannot leak into real tokens) or, for
        # packed rows, [B, 1, T, S] (a token sees the keys of its own segment only).
        out = jax.nn.dot_product_attention(q, k, v, mask=key_mask, implementation=self.implementation)
        return self.output(out.reshape(b, t, self.num_heads * self.head_dim))


class Layer(nnx.Module):
    """One post-LN transformer block: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, cfg: EncoderConfig, *, dtype: jnp.dtype, attention: str, rngs: nnx.Rngs) -> None:
        self.attention = SelfAttention(cfg, dtype=dtype, attention=attention, rngs=rngs)
        self.attention_norm = _layer_norm(rngs, cfg, dtype)
        self.intermediate = _dense(rngs, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), "mlp", dtype)
        self.output = _dense(rngs, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), "norm", dtype)
        self.output_norm = _layer_norm(rngs, cfg, dtype)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = self.attention_norm(x + self.attention(x, key_mask))
        return self.output_norm(x + self.output(gelu(self.intermediate(x))))


def _run_layer(layer: Layer, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    return layer(x, key_mask)


class Encoder(nnx.Module):
    """ids [B, T], mask [B, T] -> float32 hidden states [B, T, H] (and `pool_cls` for the HF pooler)."""

    def __init__(self, cfg: EncoderConfig, *, with_pooler: bool = True, dtype: str | jnp.dtype = "float32",
                 remat: bool = False, attention: str = "auto", rngs: nnx.Rngs | None = None) -> None:
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"Encoder: compute dtype {dtype} is not float32 or bfloat16 (config.model.compute_dtype)")
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"Encoder: attention {attention!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)} "
                             "(config.model.attention)")
        self.cfg = cfg
        self.dtype = dtype
        self.remat = bool(remat)
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, dtype=dtype, attention=attention, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        # The pooler (dense + tanh on [CLS]) exists only when the checkpoint has one (MiniLM, LaBSE do;
        # multilingual-e5 does not); it is kept even when unused so export writes back what was loaded.
        self.pooler = (_dense(rngs, cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), "mlp", dtype)
                       if with_pooler else None)

    def __call__(self, ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """`segment_ids` [B, T] marks packed rows (mlret.data.packing): tokens with the same id >= 0 form one text
        (attention within it only, positions restarting at its first token), -1 is padding; `mask` is then
        unused (the segments say everything)."""
        if ids.shape[-1] > self.cfg.max_length:
            raise ValueError(f"sequence length {ids.shape[-1]} exceeds the model's {self.cfg.max_length} positions; "
                             "lower config.data.query_len / config.data.passage_len")
        if segment_ids is None:
            key_mask = (mask > 0)[:, None, None, :]
        else:  # padding (-1) attends to padding, so no row of the mask is empty
            key_mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        # The hidden states are pinned to the batch sharding between blocks (common.constrain; a no-op off a mesh).
        x = constrain(self.embeddings(ids, token_type_ids, segment_ids))
        # nnx.remat recomputes each block's activations in the backward pass: memory O(1 layer) for one extra
        # forward; applied per layer so XLA still sees (and overlaps) the whole stack.
        run = nnx.remat(_run_layer) if self.remat else _run_layer
        for layer in self.layers:
            x = constrain(run(layer, x, key_mask))
        return x.astype(jnp.float32)

    def pool_cls(self, hidden: jax.Array) -> jax.Array:
        """HF's pooler_output: tanh(dense(hidden[:, 0])) in float32."""
        return self.pool_first_tokens(hidden[:, 0])

    def pool_first_tokens(self, first: jax.Array) -> jax.Array:
        """The pooler on the texts' first-token states [N, H] (what `pool_cls` takes from padded rows)."""
        if self.pooler is None:
            raise ValueError("pooling 'pooler' needs the checkpoint's pooler weights (pooler.dense.*), which this "
                             "model does not have; use config.model.pooling='cls' or 'mean'")
        return jnp.tanh(self.pooler(first.astype(self.dtype))).astype(jnp.float32)
