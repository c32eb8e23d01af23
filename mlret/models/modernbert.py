"""The ModernBERT family (model_type modernbert; mmBERT is one): numerically equal to `transformers.ModernBertModel`.

Pre-LN blocks (the first layer has no attention norm), rotary positions (one theta for global layers, one for
local), GeGLU MLP, LayerNorms and linear layers with or without biases as `norm_bias` / `attention_bias` /
`mlp_bias` say, a final norm, and alternating attention: `layer_types` (or, in older config files, every
`global_attn_every_n_layers`-th layer from 0) attend to the whole text, the others to keys within
`local_attention // 2` tokens on either side (HF's bidirectional sliding window). HF unpads the batch for flash
attention; here rows stay padded (or packed) with a boolean mask, the same function: jax has no varlen
attention kernel, and packing (`mlret.data.packing`) is how mlret avoids computing on padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlret.models.common import (
    Projection,
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
_THETA = {"full_attention": 160_000.0, "sliding_attention": 10_000.0}  # HF's defaults (global, local)


@dataclasses.dataclass(frozen=True)
class ModernBertConfig(ConfigFields):
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    layer_types: tuple[str, ...]  # "full_attention" | "sliding_attention", one per layer
    local_attention: int  # the whole local window; a token sees local_attention // 2 on either side
    global_rope_theta: float
    local_rope_theta: float

    @property
    def architecture(self) -> str:
        return "ModernBertModel"

    @property
    def window(self) -> int:
        return self.local_attention // 2

    def theta(self, layer_type: str) -> float:
        return self.global_rope_theta if layer_type == "full_attention" else self.local_rope_theta

    @classmethod
    def read(cls, raw: dict[str, Any], where: str) -> ModernBertConfig:
        require(raw, where, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
        act = raw.get("hidden_activation", "gelu")
        if act != "gelu":
            raise ValueError(f"{where}: hidden_activation {act!r} is not supported; the ModernBERT family "
                             "implements exact (erf) GELU, HF's 'gelu'")
        if raw["hidden_size"] % raw["num_attention_heads"]:
            raise ValueError(f"{where}: hidden_size {raw['hidden_size']} is not a multiple of num_attention_heads "
                             f"{raw['num_attention_heads']}")
        layers = int(raw["num_hidden_layers"])
        every = int(raw.get("global_attn_every_n_layers", 3))
        types = tuple(raw.get("layer_types") or ["sliding_attention" if i % every else "full_attention"
                                                 for i in range(layers)])
        if len(types) != layers or set(types) - set(_THETA):
            raise ValueError(f"{where}: layer_types {list(types)} must name full_attention or sliding_attention for "
                             f"each of the {layers} layers")
        rope = raw.get("rope_parameters") or {}
        thetas = {}
        for kind, legacy in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
            params = rope.get(kind) or {}
            if params.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
                raise ValueError(f"{where}: rope_parameters[{kind!r}] {params} is not supported (default rope only)")
            thetas[kind] = float(params.get("rope_theta", raw.get(legacy, _THETA[kind])))
        return cls(
            model_type="modernbert", vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
            num_layers=layers, num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
            norm_eps=float(raw.get("norm_eps", 1e-5)), norm_bias=bool(raw.get("norm_bias", False)),
            attention_bias=bool(raw.get("attention_bias", False)), mlp_bias=bool(raw.get("mlp_bias", False)),
            layer_types=types, local_attention=int(raw.get("local_attention", 128)),
            global_rope_theta=thetas["full_attention"], local_rope_theta=thetas["sliding_attention"],
            pad_token_id=int(raw.get("pad_token_id", 50283)), hf_config=raw)

    def to_hf(self) -> dict[str, Any]:
        return export_config(
            self.hf_config, architectures=[self.architecture], model_type="modernbert", vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
            norm_eps=self.norm_eps, norm_bias=self.norm_bias, attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias, layer_types=list(self.layer_types), local_attention=self.local_attention,
            hidden_activation="gelu", pad_token_id=self.pad_token_id)


def _layer_norm(cfg: ModernBertConfig, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] as torch computes it.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.norm_eps, use_bias=cfg.norm_bias, dtype=dtype,
                         param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs, scale_metadata=axes("norm"),
                         bias_metadata=axes("norm"))


class Attention(nnx.Module):
    """Fused QKV kernel [embed, 3, heads, head_dim] (HF's Wqkv), rotary q / k, output kernel [heads, head_dim,
    embed] (HF's Wo): both shard by head along the tensor axis."""

    def __init__(self, cfg: ModernBertConfig, *, dtype: jnp.dtype, attention: str, rngs: nnx.Rngs) -> None:
        n, d, h = cfg.num_heads, cfg.head_dim, cfg.hidden_size
        bias = cfg.attention_bias
        self.qkv = Projection((h, 3, n, d), ("embed", None, "heads", None),
                              bias_axes=(None, "heads", None) if bias else None, dtype=dtype, rngs=rngs)
        self.out = Projection((n, d, h), ("heads", None, "embed"), inputs=2, bias_axes=("norm",) if bias else None,
                              dtype=dtype, rngs=rngs)
        self.implementation = None if attention == "auto" else attention

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
        qkv = self.qkv(x)  # [B, T, 3, N, D]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = rope(q, positions, theta), rope(k, positions, theta)
        return self.out(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation))


class Layer(nnx.Module):
    """x = x + attn(norm(x)); x = x + Wo(gelu(input) * gate), [input, gate] = Wi(norm(x)) (GeGLU)."""

    def __init__(self, cfg: ModernBertConfig, index: int, *, dtype: jnp.dtype, attention: str,
                 rngs: nnx.Rngs) -> None:
        self.attn_norm = _layer_norm(cfg, dtype, rngs) if index > 0 else None  # HF: Identity in layer 0
        self.attn = Attention(cfg, dtype=dtype, attention=attention, rngs=rngs)
        self.mlp_norm = _layer_norm(cfg, dtype, rngs)
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.wi = Projection((h, 2, i), ("embed", None, "mlp"), bias_axes=(None, "mlp") if cfg.mlp_bias else None,
                             dtype=dtype, rngs=rngs)
        self.wo = Projection((i, h), ("mlp", "embed"), bias_axes=("norm",) if cfg.mlp_bias else None, dtype=dtype,
                             rngs=rngs)
        self.layer_type = cfg.layer_types[index]
        self.theta = cfg.theta(self.layer_type)

    def __call__(self, x: jax.Array, masks: dict[str, jax.Array], positions: jax.Array) -> jax.Array:
        h = x if self.attn_norm is None else self.attn_norm(x)
        x = x + self.attn(h, masks[self.layer_type], positions, self.theta)
        gated = self.wi(self.mlp_norm(x))  # [B, T, 2, I]
        return x + self.wo(jax.nn.gelu(gated[:, :, 0], approximate=False) * gated[:, :, 1])


def _run_layer(layer: Layer, x: jax.Array, masks: dict[str, jax.Array], positions: jax.Array) -> jax.Array:
    return layer(x, masks, positions)


class ModernBert(nnx.Module):
    """ids [B, T], mask [B, T] -> float32 hidden states [B, T, H] (`mlret.models.family.EncoderModule`)."""

    def __init__(self, cfg: ModernBertConfig, *, with_pooler: bool = False, dtype: str | jnp.dtype = "float32",
                 remat: bool = False, attention: str = "auto", rngs: nnx.Rngs | None = None) -> None:
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"ModernBert: compute dtype {dtype} is not float32 or bfloat16 "
                             "(config.model.compute_dtype)")
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"ModernBert: attention {attention!r} is not one of "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)} (config.model.attention)")
        if with_pooler:
            raise ValueError("ModernBERT has no pooler; use config.model.pooling='cls' or 'mean'")
        self.cfg, self.dtype, self.remat = cfg, dtype, bool(remat)
        self.pooler = None
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                               embedding_init=init, rngs=rngs, embedding_metadata=axes("vocab", "embed"))
        self.embed_norm = _layer_norm(cfg, dtype, rngs)
        self.layers = nnx.List([Layer(cfg, i, dtype=dtype, attention=attention, rngs=rngs)
                                for i in range(cfg.num_layers)])
        self.final_norm = _layer_norm(cfg, dtype, rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        if token_type_ids is not None:
            raise ValueError("ModernBERT has no token types (token_type_ids must be None)")
        if ids.shape[-1] > self.cfg.max_length:
            raise ValueError(f"sequence length {ids.shape[-1]} exceeds the model's {self.cfg.max_length} positions; "
                             "lower config.data.query_len / config.data.passage_len")
        segments = padded_segments(mask) if segment_ids is None else segment_ids
        masks = {"full_attention": attention_mask(segments),
                 "sliding_attention": attention_mask(segments, window=self.cfg.window)}
        positions = text_positions(mask, segment_ids)
        x = constrain(self.embed_norm(lookup(self.embed, ids)))  # pinned between blocks (common.constrain)
        run = nnx.remat(_run_layer) if self.remat else _run_layer
        for layer in self.layers:
            x = constrain(run(layer, x, masks, positions))
        return self.final_norm(x).astype(jnp.float32)

    def pool_first_tokens(self, first: jax.Array) -> jax.Array:
        raise ValueError("ModernBERT has no pooler; use config.model.pooling='cls' or 'mean'")


def param_rows(cfg: ModernBertConfig, with_pooler: bool) -> list[ParamRow]:
    """ModernBertModel's state dict (ModernBertForMaskedLM etc. keep it under `model.`)."""
    rows = [ParamRow(("embed", "embedding"), "embeddings.tok_embeddings.weight")]

    def norm(ours: tuple, hf: str) -> None:
        rows.append(ParamRow((*ours, "scale"), f"{hf}.weight"))
        if cfg.norm_bias:
            rows.append(ParamRow((*ours, "bias"), f"{hf}.bias"))

    def linear(ours: tuple, hf: str, bias: bool, split: int = 1) -> None:
        rows.append(ParamRow((*ours, "kernel"), f"{hf}.weight", transpose=True, split=split))
        if bias:
            rows.append(ParamRow((*ours, "bias"), f"{hf}.bias", split=0))

    norm(("embed_norm",), "embeddings.norm")
    for i in range(cfg.num_layers):
        ours, hf = ("layers", i), f"layers.{i}"
        if i > 0:
            norm((*ours, "attn_norm"), f"{hf}.attn_norm")
        linear((*ours, "attn", "qkv"), f"{hf}.attn.Wqkv", cfg.attention_bias)
        linear((*ours, "attn", "out"), f"{hf}.attn.Wo", cfg.attention_bias, split=2)
        norm((*ours, "mlp_norm"), f"{hf}.mlp_norm")
        linear((*ours, "wi"), f"{hf}.mlp.Wi", cfg.mlp_bias)
        linear((*ours, "wo"), f"{hf}.mlp.Wo", cfg.mlp_bias)
    norm(("final_norm",), "final_norm")
    return rows


def matmul_params(cfg: ModernBertConfig) -> int:
    """Wqkv (3 h^2), Wo (h^2), Wi (2 h i) and the MLP's Wo (h i) per layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_layers * (4 * h * h + 3 * h * i)


FAMILIES = (Family("modernbert", ModernBertConfig.read, ModernBert, param_rows,
                   anchor="embeddings.tok_embeddings.weight", prefixes=("", "model."),
                   poolings=("cls", "mean", "last"), matmul_params=matmul_params,
                   describe="ModernBERT / mmBERT pre-LN encoders"),)
