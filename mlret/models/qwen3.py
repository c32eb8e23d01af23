"""The Qwen3 family (model_type qwen3; decoder embedders such as Qwen3-Embedding): numerically equal to
`transformers.Qwen3Model`.

Pre-norm decoder blocks with RMSNorm, RMSNorm on each query and key head (q / k norm) before rotary positions,
grouped-query attention (`num_key_value_heads` <= `num_attention_heads`), causal attention, a SwiGLU MLP and a
final norm. Embeddings pool the last token (`config.model.pooling='last'`, the Qwen3-Embedding recipe; 'mean' is
the option). Positions count from each text's first real token, so left padding (Qwen3-Embedding's tokenizer
side), right padding and packed rows give one text the same states; HF numbers left-padded rows from the row
start instead, which rotary attention cannot tell apart (it sees only position differences).

Sharding: query heads carry the logical axis `heads`, key / value heads `kv` (kernels [embed, kv_heads,
head_dim]); with the default rules both go to the tensor axis, and where `num_key_value_heads` does not divide
over it the kv kernels stay replicated (`mlret.parallel.logical_to_spec` logs it; `check_param_sharding` makes it
an error above `config.mesh.replicated_param_threshold` elements).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlret.models.common import (
    Projection,
    RMSNorm,
    attention_mask,
    axes,
    constrain,
    init,
    lookup,
    padded_segments,
    rope,
    text_positions,
)
from mlret.models.family import ConfigFields, Family, ParamRow, export_config, require

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class Qwen3Config(ConfigFields):
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool

    @property
    def architecture(self) -> str:
        return "Qwen3Model"

    @classmethod
    def read(cls, raw: dict[str, Any], where: str) -> Qwen3Config:
        require(raw, where, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act {act!r} is not supported; the Qwen3 family implements SwiGLU "
                             "(HF's 'silu')")
        if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or ()):
            raise ValueError(f"{where}: sliding-window layers (use_sliding_window / layer_types) are not supported; "
                             "the Qwen3 family attends to the whole text")
        heads = int(raw["num_attention_heads"])
        kv = int(raw.get("num_key_value_heads") or heads)
        if heads % kv:
            raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise ValueError(f"{where}: rope_parameters {rope or raw.get('rope_scaling')} is not supported "
                             "(default rope only)")
        pad = raw.get("pad_token_id")
        if pad is None:  # Qwen3 configs often leave it unset; the tokenizer's pad id is only padding here
            eos = raw.get("eos_token_id", 0)
            pad = eos[0] if isinstance(eos, list) else (eos or 0)
        return cls(
            model_type="qwen3", vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]), num_heads=heads, num_kv_heads=kv,
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            intermediate_size=int(raw["intermediate_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            attention_bias=bool(raw.get("attention_bias", False)), pad_token_id=int(pad), hf_config=raw)

    def to_hf(self) -> dict[str, Any]:
        return export_config(
            self.hf_config, architectures=[self.architecture], model_type="qwen3", vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            attention_bias=self.attention_bias, hidden_act="silu")


class Attention(nnx.Module):
    """q [embed, heads, head_dim], k / v [embed, kv_heads, head_dim], o [heads, head_dim, embed]; q / k norm."""

    def __init__(self, cfg: Qwen3Config, *, dtype: jnp.dtype, attention: str, rngs: nnx.Rngs) -> None:
        h, n, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q = Projection((h, n, d), ("embed", "heads", None), bias_axes=("heads", None) if b else None,
                            dtype=dtype, rngs=rngs)
        self.k = Projection((h, kv, d), ("embed", "kv", None), bias_axes=("kv", None) if b else None, dtype=dtype,
                            rngs=rngs)
        self.v = Projection((h, kv, d), ("embed", "kv", None), bias_axes=("kv", None) if b else None, dtype=dtype,
                            rngs=rngs)
        self.o = Projection((n, d, h), ("heads", None, "embed"), inputs=2, bias_axes=("norm",) if b else None,
                            dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.theta = cfg.rope_theta
        self.implementation = None if attention == "auto" else attention

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        q = rope(self.q_norm(self.q(x)), positions, self.theta)
        k = rope(self.k_norm(self.k(x)), positions, self.theta)
        # Grouped-query attention: jax repeats each of the K kv heads over N / K query heads.
        out = jax.nn.dot_product_attention(q, k, self.v(x), mask=mask, implementation=self.implementation)
        return self.o(out)


class Layer(nnx.Module):
    """x = x + attn(rmsnorm(x)); x = x + down(silu(gate(y)) * up(y)), y = rmsnorm(x)."""

    def __init__(self, cfg: Qwen3Config, *, dtype: jnp.dtype, attention: str, rngs: nnx.Rngs) -> None:
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.input_norm = RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype)
        self.attn = Attention(cfg, dtype=dtype, attention=attention, rngs=rngs)
        self.post_attention_norm = RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype)
        self.gate = Projection((h, i), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up = Projection((h, i), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down = Projection((i, h), ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.attn(self.input_norm(x), mask, positions)
        y = self.post_attention_norm(x)
        return x + self.down(jax.nn.silu(self.gate(y)) * self.up(y))


def _run_layer(layer: Layer, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
    return layer(x, mask, positions)


class Qwen3(nnx.Module):
    """ids [B, T], mask [B, T] -> float32 hidden states [B, T, H] (`mlret.models.family.EncoderModule`)."""

    def __init__(self, cfg: Qwen3Config, *, with_pooler: bool = False, dtype: str | jnp.dtype = "float32",
                 remat: bool = False, attention: str = "auto", rngs: nnx.Rngs | None = None) -> None:
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"Qwen3: compute dtype {dtype} is not float32 or bfloat16 (config.model.compute_dtype)")
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"Qwen3: attention {attention!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)} "
                             "(config.model.attention)")
        if with_pooler:
            raise ValueError("Qwen3 has no pooler; use config.model.pooling='last' or 'mean'")
        self.cfg, self.dtype, self.remat = cfg, dtype, bool(remat)
        self.pooler = None
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                               embedding_init=init, rngs=rngs, embedding_metadata=axes("vocab", "embed"))
        self.layers = nnx.List([Layer(cfg, dtype=dtype, attention=attention, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        if token_type_ids is not None:
            raise ValueError("Qwen3 has no token types (token_type_ids must be None)")
        if ids.shape[-1] > self.cfg.max_length:
            raise ValueError(f"sequence length {ids.shape[-1]} exceeds the model's {self.cfg.max_length} positions; "
                             "lower config.data.query_len / config.data.passage_len")
        segments = padded_segments(mask) if segment_ids is None else segment_ids
        mask4 = attention_mask(segments, causal=True)
        positions = text_positions(mask, segment_ids)
        x = constrain(lookup(self.embed, ids))  # pinned between blocks (common.constrain)
        run = nnx.remat(_run_layer) if self.remat else _run_layer
        for layer in self.layers:
            x = constrain(run(layer, x, mask4, positions))
        return self.norm(x).astype(jnp.float32)

    def pool_first_tokens(self, first: jax.Array) -> jax.Array:
        raise ValueError("Qwen3 has no pooler; use config.model.pooling='last' or 'mean'")


def param_rows(cfg: Qwen3Config, with_pooler: bool) -> list[ParamRow]:
    """Qwen3Model's state dict (Qwen3ForCausalLM keeps it under `model.`; its lm_head is not read)."""
    rows = [ParamRow(("embed", "embedding"), "embed_tokens.weight")]

    def linear(ours: tuple, hf: str, bias: bool, split: int = 1) -> None:
        rows.append(ParamRow((*ours, "kernel"), f"{hf}.weight", transpose=True, split=split))
        if bias:
            rows.append(ParamRow((*ours, "bias"), f"{hf}.bias", split=0))

    for i in range(cfg.num_layers):
        ours, hf = ("layers", i), f"layers.{i}"
        rows.append(ParamRow((*ours, "input_norm", "scale"), f"{hf}.input_layernorm.weight"))
        for name in ("q", "k", "v"):
            linear((*ours, "attn", name), f"{hf}.self_attn.{name}_proj", cfg.attention_bias)
        linear((*ours, "attn", "o"), f"{hf}.self_attn.o_proj", cfg.attention_bias, split=2)
        rows.append(ParamRow((*ours, "attn", "q_norm", "scale"), f"{hf}.self_attn.q_norm.weight"))
        rows.append(ParamRow((*ours, "attn", "k_norm", "scale"), f"{hf}.self_attn.k_norm.weight"))
        rows.append(ParamRow((*ours, "post_attention_norm", "scale"), f"{hf}.post_attention_layernorm.weight"))
        for name in ("gate", "up", "down"):
            linear((*ours, name), f"{hf}.mlp.{name}_proj", False)
    rows.append(ParamRow(("norm", "scale"), "norm.weight"))
    return rows


def matmul_params(cfg: Qwen3Config) -> int:
    """q and o (h x heads*head_dim), k and v (h x kv_heads*head_dim) and the three SwiGLU matrices per layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    w, w_kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (2 * h * w + 2 * h * w_kv + 3 * h * i)


FAMILIES = (Family("qwen3", Qwen3Config.read, Qwen3, param_rows, anchor="embed_tokens.weight",
                   prefixes=("", "model."), poolings=("last", "mean"), matmul_params=matmul_params,
                   attention_width=lambda cfg: cfg.num_heads * cfg.head_dim,
                   describe="Qwen3 decoder embedders"),)
