"""Hugging Face checkpoints <-> NNX encoder parameters, and `load_dual_encoder` from `config.model`.

The mapping between HF tensor names and our parameter paths is one table (`param_mapping`), used in both
directions (import here, export in `mlret.export`), so the two cannot drift apart. Loading never executes code
from a model folder: safetensors first; `pytorch_model.bin` (a pickle) only through
`torch.load(weights_only=True)`; never `trust_remote_code`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from mlret import storage
from mlret.models.dual_encoder import DualEncoder, Tied, Untied
from mlret.models.family import Family, ParamRow, family_of, read_hf_config
from mlret.models.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# Files fetched from the hub: config, tokenizer, sentence-transformers metadata and safetensors weights.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "1_Pooling/*"]

Path_ = tuple[Any, ...]


def param_mapping(cfg: Any, *, with_pooler: bool) -> list[ParamRow]:
    """The family's table (`ParamRow`: our parameter path, HF tensor name without prefix, layout) for every
    encoder parameter of `cfg`; the one table import and export both use."""
    return family_of(cfg).param_rows(cfg, with_pooler)


# ---------------------------------------------------------------------------------------------- files


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """A local model folder as is; a gs:// folder copied to a local cache (`mlret.storage.download_dir`: the
    tokenizer and safetensors libraries read local files only); otherwise a hub id, downloaded (config, tokenizer,
    weights) to the HF cache."""
    name = str(name_or_path)
    if storage.is_gcs(name):
        return Path(os.fspath(storage.download_dir(storage.path(name, "config.model.name"))))
    if not name:
        raise ValueError("config.model.name is empty: set it (or the MLRET_MODEL environment variable) to a "
                         "Hugging Face hub id or a local model folder")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"config.model.name={name!r} is not a model folder (and not a hub id)")
    try:
        local = Path(huggingface_hub.snapshot_download(repo_id=name, allow_patterns=_HUB_PATTERNS))
        if not any(local.glob("*.safetensors")):
            # Only then fetch the pickle; read_hf_tensors opens it with torch.load(weights_only=True).
            local = Path(huggingface_hub.snapshot_download(repo_id=name,
                                                           allow_patterns=[*_HUB_PATTERNS, "pytorch_model.bin"]))
    except Exception as e:  # offline, unknown repo, gated repo, network: one message naming the field
        raise FileNotFoundError(f"config.model.name={name!r} is not a local folder and could not be fetched from "
                                f"the Hugging Face hub ({type(e).__name__}: {e})") from e
    return local


def read_hf_tensors(model_dir: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of a HF checkpoint folder as float32 numpy arrays, and a description of where they came from."""
    d = Path(model_dir)
    single, index, pickle = d / "model.safetensors", d / "model.safetensors.index.json", d / "pytorch_model.bin"
    if single.is_file() or index.is_file():
        files = [single] if single.is_file() else sorted(
            {d / f for f in json.loads(index.read_text())["weight_map"].values()})
        tensors: dict[str, np.ndarray] = {}
        for f in files:
            try:
                tensors.update(safetensors.numpy.load_file(str(f)))
            except Exception as e:  # bf16 tensors cannot be read as numpy: go through torch if it is there
                if "bfloat16" not in str(e) and "bf16" not in str(e).lower():
                    raise
                tensors.update(_torch_safetensors(f))
        return {k: _f32(v) for k, v in tensors.items()}, str(files[0] if len(files) == 1 else index)
    if pickle.is_file():
        try:
            import torch  # lazy: optional (only a pytorch_model.bin needs it)
        except ImportError as e:
            raise ImportError(f"{pickle}: reading pytorch_model.bin needs torch (pip install torch); or convert the "
                              "checkpoint to model.safetensors") from e
        state = torch.load(str(pickle), map_location="cpu", weights_only=True)
        return {k: _f32(v.float().numpy()) for k, v in state.items() if hasattr(v, "numpy")}, str(pickle)
    raise FileNotFoundError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _torch_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file  # lazy: needs torch (optional)

    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32) if a.dtype != np.float32 and a.dtype.kind == "f" else a


def _find(tensors: Mapping[str, np.ndarray], prefix: str, name: str) -> np.ndarray | None:
    """Look a tensor up, accepting the old TF-era LayerNorm names (gamma / beta)."""
    for candidate in (name, name.replace("LayerNorm.weight", "LayerNorm.gamma"),
                      name.replace("LayerNorm.bias", "LayerNorm.beta")):
        if prefix + candidate in tensors:
            return tensors[prefix + candidate]
    return None


def _detect_prefix(tensors: Mapping[str, np.ndarray], source: str, family: Family) -> str:
    for prefix in family.prefixes:
        if f"{prefix}{family.anchor}" in tensors:
            return prefix
    raise KeyError(f"{source}: missing tensor {family.anchor} (also tried the prefixes "
                   f"{', '.join(p for p in family.prefixes if p)}); is this a {family.name} checkpoint "
                   f"({family.describe or family.name})?")


# ---------------------------------------------------------------------------------------------- import


def encoder_from_tensors(cfg: Any, tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint",
                         dtype: str = "float32", remat: bool = False, with_pooler: bool | None = None,
                         attention: str = "auto") -> Any:
    """Build the family's encoder module for `cfg` whose parameters are the given HF tensors (exact copies,
    float32).

    with_pooler=None: keep the pooler when the family has one and the checkpoint holds it.
    """
    family = family_of(cfg)
    prefix = _detect_prefix(tensors, source, family)
    if with_pooler is None:
        with_pooler = family.pooler_tensor is not None and _find(tensors, prefix, family.pooler_tensor) is not None
    # eval_shape: no random initialisation of weights about to be overwritten; eager sharding off so the model
    # can be built outside a mesh (the trainer places it later with nnx.get_named_sharding).
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: family.module(cfg, with_pooler=with_pooler, dtype=dtype, remat=remat,
                                                        attention=attention, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    mapping = param_mapping(cfg, with_pooler=with_pooler)
    unmapped = set(variables) - {row.path for row in mapping}
    if unmapped:  # the table and the modules disagree: a bug in mlret, not in the checkpoint
        raise AssertionError(f"parameters without a HF name: {sorted(map(str, unmapped))}")
    for row in mapping:
        value = _find(tensors, prefix, row.hf)
        if value is None:
            raise KeyError(f"{source}: missing tensor {prefix}{row.hf} (needed for {'/'.join(map(str, row.path))}; "
                           f"config.json says {cfg.num_layers} layers"
                           + (f", type_vocab_size={cfg.type_vocab_size})" if hasattr(cfg, "type_vocab_size") else ")"))
        var = variables[row.path]
        want = row.hf_shape(var.shape)
        if tuple(value.shape) != want:
            raise ValueError(f"{source}: tensor {prefix}{row.hf} has shape {tuple(value.shape)} but config.json "
                             f"implies {want}")
        var.set_value(jnp.asarray(np.ascontiguousarray(row.to_ours(value, var.shape)), dtype=jnp.float32))
    with nnx.use_eager_sharding(False):
        return nnx.merge(graphdef, state)


def load_encoder(name_or_path: str | os.PathLike[str], *, dtype: str = "float32", remat: bool = False) -> Any:
    """The encoder module (any registered family) with the weights of a HF model folder or hub id."""
    model_dir = resolve_model_dir(name_or_path)
    cfg = read_hf_config(model_dir)
    tensors, source = read_hf_tensors(model_dir)
    return encoder_from_tensors(cfg, tensors, source=source, dtype=dtype, remat=remat)


def encoder_to_tensors(encoder: Any) -> dict[str, np.ndarray]:
    """The encoder's parameters under HF names (no prefix, torch layout), float32 numpy: the state dict of the
    family's HF model class (BertModel, ModernBertModel, Qwen3Model, ...)."""
    variables = dict(nnx.to_flat_state(nnx.state(encoder, nnx.Param)))
    out = {}
    for row in param_mapping(encoder.cfg, with_pooler=getattr(encoder, "pooler", None) is not None):
        value = np.asarray(jax.device_get(variables[row.path].get_value()), dtype=np.float32)
        out[row.hf] = np.ascontiguousarray(row.to_hf(value))
    return out


def _copy_encoder(encoder: Any) -> Any:
    """An independent copy with its own buffers (two towers must not share buffers that jit may donate)."""
    graphdef, state = nnx.split(encoder)
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    with nnx.use_eager_sharding(False):
        return nnx.merge(graphdef, state)


def check_vocab(tokenizer: TextTokenizer, cfg: Any, where: str) -> None:
    """Every id the tokenizer can emit must index a row of the word-embedding matrix."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the word-embedding matrix "
                         f"has {cfg.vocab_size} rows (config.json vocab_size); ids >= {cfg.vocab_size} would "
                         "index past it: use the model's own tokenizer")


def load_dual_encoder(model_config: Any, *, query_len: int | None = None,
                      passage_len: int | None = None) -> tuple[DualEncoder, TextTokenizer]:
    """DualEncoder and TextTokenizer from `config.model` (name, pooling, normalize, tied, prefixes, dtypes, remat).

    Also accepts the whole config, in which case the static lengths come from `config.data`; with `config.model`
    alone, pass `query_len` / `passage_len`.
    """
    if "model" in model_config and "data" in model_config:
        query_len = model_config.data.query_len if query_len is None else query_len
        passage_len = model_config.data.passage_len if passage_len is None else passage_len
        model_config = model_config.model
    if query_len is None or passage_len is None:  # the models know nothing of the config schema's defaults
        raise ValueError("load_dual_encoder(config.model): pass query_len= and passage_len=, or the whole config "
                         "(its config.data has them)")
    if model_config.param_dtype != "float32":
        raise ValueError(f"config.model.param_dtype={model_config.param_dtype!r}: parameters are kept in float32 "
                         "(use config.model.compute_dtype='bfloat16' for bfloat16 activations)")
    model_dir = resolve_model_dir(model_config.name)
    cfg = read_hf_config(model_dir)
    family = family_of(cfg)
    if model_config.pooling not in family.poolings:
        raise ValueError(f"config.model.pooling={model_config.pooling!r}: {model_dir} is a {family.name} model, "
                         f"which pools with {', '.join(family.poolings)}")
    tokenizer = TextTokenizer(model_dir, query_len=query_len, passage_len=passage_len,
                              query_prefix=model_config.query_prefix, passage_prefix=model_config.passage_prefix)
    check_vocab(tokenizer, cfg, str(model_dir))
    for length, field in ((query_len, "data.query_len"), (passage_len, "data.passage_len")):
        if length > cfg.max_length:
            raise ValueError(f"config.{field}={length} exceeds the {cfg.max_length} positions of {model_dir}")
    _warn_pooling_mismatch(model_dir, model_config.pooling)
    tensors, source = read_hf_tensors(model_dir)
    encoder = encoder_from_tensors(cfg, tensors, source=source, dtype=model_config.compute_dtype,
                                   remat=model_config.remat, attention=model_config.get("attention", "auto"))
    towers = Tied(encoder) if model_config.tied else Untied(encoder, _copy_encoder(encoder))
    # include_prompt=False: mean pooling leaves out each prefix's tokens, measured as sentence-transformers does.
    prompt_lengths = ((0, 0) if model_config.get("include_prompt", True) else
                      (tokenizer.prompt_length(tokenizer.query_prefix),
                       tokenizer.prompt_length(tokenizer.passage_prefix)))
    model = DualEncoder(towers, pooling=model_config.pooling, normalize=model_config.normalize,
                        prompt_lengths=prompt_lengths)
    return model, tokenizer


def _warn_pooling_mismatch(model_dir: Path, pooling: str) -> None:
    """A sentence-transformers folder says how it was trained to pool; differing from it is allowed but suspicious."""
    f = model_dir / "1_Pooling" / "config.json"
    if not f.is_file():
        return
    st = json.loads(f.read_text())
    theirs = st.get("pooling_mode") or next(
        (m for m, k in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                        ("lasttoken", "pooling_mode_lasttoken")) if st.get(k)), None)
    ours = {"pooler": "cls", "last": "lasttoken"}.get(pooling, pooling)
    if theirs and theirs != ours:
        log.warning("%s pools with %r but config.model.pooling=%r", f, theirs, pooling)
