"""Encoder families: one record per Hugging Face `model_type`, everything mlret needs to load, run, export and
count an encoder of that type.

A family record (`Family`) names its config reader (`config.json` dict -> a frozen config dataclass), its Flax NNX
module (one interface for every family, `EncoderModule`: padded and packed encoding), the table between its
parameters and the HF tensor names (`ParamRow`s, used for import *and* export), the HF prefixes of task-head
checkpoints, the pooling modes it supports, and the two numbers the FLOP formula needs (`mlret.flops`). A family
is one module that exports `FAMILIES = (Family(...), ...)` plus its line in `_BUILTIN` below; code outside mlret
calls `register(family)` before loading a model (docs/architecture.md, "Adding an encoder family").
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax

Path_ = tuple[Any, ...]

# One line per family module (imported on first use, so that `mlret.models.family` stays import-light and the
# family modules can import it).
_BUILTIN = ("mlret.models.bert", "mlret.models.modernbert", "mlret.models.qwen3")


class FamilyConfig(Protocol):
    """What mlret reads off every family's config (the card, export, flops, the length checks)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    pad_token_id: int
    hf_config: dict[str, Any]

    @property
    def max_length(self) -> int: ...

    @property
    def architecture(self) -> str: ...

    def to_hf(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigFields:
    """The fields the built-in families' configs share (`EncoderConfig`, `ModernBertConfig`, `Qwen3Config` extend
    it; keyword-only, so that a family's own fields follow without defaults). `head_dim` 0 is
    hidden_size / num_heads (a config.json that gives its own, as Qwen3's may, sets it); `max_length` is the
    position table's length unless a family says otherwise (RoBERTa's offset)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    pad_token_id: int
    head_dim: int = 0
    # The raw config.json, written back on export; excluded from equality and hashing.
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings


class EncoderModule(Protocol):
    """The one encoder interface (`mlret.models.dual_encoder` calls nothing else).

    `module(ids [B, T], mask [B, T], token_type_ids=None, segment_ids=None) -> float32 hidden states [B, T, H]`:
    padded rows (mask 1 on real tokens, on either side) or packed rows (`segment_ids`: each token's text index,
    -1 for padding; attention within a text, positions restarting at its first token). `pooler` is None or the
    HF pooler, which `pool_first_tokens(first [N, H])` applies.
    """

    cfg: Any
    pooler: Any

    def __call__(self, ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array: ...

    def pool_first_tokens(self, first: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class ParamRow:
    """One parameter <-> one HF tensor.

    Import takes the HF tensor, transposes it when `transpose` (torch Linear weights are [out, in], our kernels
    [in, out]) and reshapes it to the parameter's shape (a fused or per-head layout, e.g. [embed, 3, heads,
    head_dim]); export undoes both: the parameter flattened to 2-D at axis `split` (None: no reshape; 0: to 1-D),
    then transposed.
    """

    path: Path_
    hf: str
    transpose: bool = False
    split: int | None = None

    def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The HF tensor's shape for a parameter of `shape`."""
        shape = tuple(shape)
        if self.split == 0:
            shape = (math.prod(shape),)
        elif self.split is not None:
            shape = (math.prod(shape[:self.split]), math.prod(shape[self.split:]))
        return shape[::-1] if self.transpose else shape

    def to_ours(self, value: Any, shape: Sequence[int]) -> Any:
        value = value.T if self.transpose else value
        return value.reshape(tuple(shape)) if self.split is not None else value

    def to_hf(self, value: Any) -> Any:
        if self.split is not None:
            value = value.reshape(self.hf_shape(value.shape)[::-1] if self.transpose else self.hf_shape(value.shape))
        return value.T if self.transpose else value


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything mlret needs about one HF `model_type` (see the module docstring)."""

    name: str  # the HF model_type, e.g. "bert", "modernbert", "qwen3"
    read_config: Callable[[dict[str, Any], str], Any]  # (raw config.json, where) -> frozen config (FamilyConfig)
    module: Callable[..., Any]  # module(cfg, *, with_pooler, dtype, remat, attention, rngs) -> EncoderModule
    param_rows: Callable[[Any, bool], list[ParamRow]]  # (cfg, with_pooler) -> the table, import and export
    anchor: str  # a tensor every checkpoint of the family has (finds the task-head prefix)
    prefixes: tuple[str, ...] = ("",)  # where task-head checkpoints keep the encoder ("bert.", "model.", ...)
    pooler_tensor: str | None = None  # the HF pooler's weight, when the family can have one
    poolings: tuple[str, ...] = ("cls", "mean")  # config.model.pooling values this family supports
    # FLOPs (mlret.flops): the matmul weights of the blocks (N_layer) and the width of the attention matmuls
    # (QK^T and AV cost 2 * s * attention_width each per token and layer).
    matmul_params: Callable[[Any], int] = lambda cfg: 0
    attention_width: Callable[[Any], int] = lambda cfg: cfg.hidden_size
    describe: str = ""  # one phrase for messages, e.g. "BERT post-LN encoders"


_FAMILIES: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    """Add a family (its `name` must be new, or the same record again)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"an encoder family for model_type {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in _BUILTIN:
            for family in importlib.import_module(name).FAMILIES:
                register(family)


def families() -> dict[str, Family]:
    """{model_type: Family}, built-in families first."""
    _load_builtin()
    return dict(_FAMILIES)


def supported_model_types() -> tuple[str, ...]:
    return tuple(families())


def get(model_type: Any, where: str = "config.json") -> Family:
    """The family of `model_type`; an unsupported one is a one-line error listing the supported types."""
    table = families()
    if model_type not in table:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; mlret's encoder families: "
                         f"{', '.join(table)} (register another with mlret.models.family.register)")
    return table[model_type]


def family_of(cfg: Any) -> Family:
    return get(cfg.model_type, f"{type(cfg).__name__}")


def read_raw(source: str | os.PathLike[str] | dict[str, Any], where: str = "") -> tuple[dict[str, Any], str]:
    """(config.json as a dict, where it came from) from a path to config.json, a model folder or a dict."""
    if isinstance(source, dict):
        return dict(source), where or "config dict"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; point config.model.name at a Hugging Face model folder "
                                "(config.json + weights + tokenizer) or a hub id")
    return json.loads(path.read_text()), str(path)


def read_hf_config(source: str | os.PathLike[str] | dict[str, Any], *, where: str = "") -> Any:
    """The family config of a HF `config.json` (path, model folder or dict), read by its family's reader."""
    raw, where = read_raw(source, where)
    return get(raw.get("model_type"), where).read_config(raw, where)


def require(raw: dict[str, Any], where: str, *fields: str) -> None:
    """A family reader's check that `fields` are present."""
    missing = [k for k in fields if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")


def export_config(hf_config: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """config.json for export: the source file without loader noise, `fields` written over it."""
    out = {k: v for k, v in hf_config.items() if k not in ("_name_or_path", "torch_dtype", "dtype")}
    out.update(fields)
    out["torch_dtype"] = "float32"
    return out
