"""The BERT family's architecture, read from a Hugging Face `config.json` (model types bert, xlm-roberta, roberta).

One frozen dataclass holds every architectural number the NNX modules need; `from_hf` validates the file so
that an unsupported checkpoint fails here, naming the file and the field, rather than deep inside a forward
pass. The raw `config.json` dict is kept so that export can write the same file back (plus our changes).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import huggingface_hub

from mlret.models.family import ConfigFields, read_hf_config, read_raw

# model_type -> (architecture written on export, RoBERTa-style padding-offset positions)
SUPPORTED_MODEL_TYPES: dict[str, tuple[str, bool]] = {
    "bert": ("BertModel", False),
    "xlm-roberta": ("XLMRobertaModel", True),
    "roberta": ("RobertaModel", True),
}
# HF names of exact (erf) GELU; "gelu_new" / "gelu_pytorch_tanh" are the tanh approximation, a different function.
_EXACT_GELU = ("gelu",)


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ConfigFields):
    """Architecture of a post-LN BERT / RoBERTa encoder (the fields of HF's BertConfig we use)."""

    type_vocab_size: int
    layer_norm_eps: float

    @property
    def roberta_positions(self) -> bool:
        """RoBERTa / XLM-R number positions from pad_token_id + 1 and skip padding (HF's padding offset)."""
        return SUPPORTED_MODEL_TYPES[self.model_type][1]

    @property
    def max_length(self) -> int:
        """Longest sequence the position table covers (RoBERTa loses pad_token_id + 1 slots to the offset)."""
        if self.roberta_positions:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @property
    def architecture(self) -> str:
        return SUPPORTED_MODEL_TYPES[self.model_type][0]

    @classmethod
    def from_hf(cls, source: str | os.PathLike[str] | dict[str, Any], *, where: str = "") -> EncoderConfig:
        """Read a BERT-family HF config: a path to config.json, a model folder, or an already-parsed dict.

        `where` names the origin of a dict in error messages. (`mlret.models.family.read_hf_config` reads any
        registered family's.)
        """
        raw, where = read_raw(source, where)
        return cls.read(raw, where)

    @classmethod
    def read(cls, raw: dict[str, Any], where: str) -> EncoderConfig:
        """The BERT family's config reader (`mlret.models.bert`): validate `raw` (config.json) and keep it."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{where}: model_type {model_type!r} is not supported by the BERT family; it handles "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} (BERT / RoBERTa post-LN encoders)")
        act = raw.get("hidden_act", "gelu")
        if act not in _EXACT_GELU:
            raise ValueError(f"{where}: hidden_act {act!r} is not supported; the encoder implements exact "
                             "(erf) GELU, HF's 'gelu'")
        pos_type = raw.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"{where}: position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            raise ValueError(f"{where}: decoder / cross-attention configs are not supported (encoder only)")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "max_position_embeddings") if k not in raw]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        if raw["hidden_size"] % raw["num_attention_heads"]:
            raise ValueError(f"{where}: hidden_size {raw['hidden_size']} is not a multiple of "
                             f"num_attention_heads {raw['num_attention_heads']}")
        return cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            max_position_embeddings=int(raw["max_position_embeddings"]),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            # BertConfig's default pad_token_id is 0, RobertaConfig's is 1.
            pad_token_id=int(raw.get("pad_token_id", 1 if SUPPORTED_MODEL_TYPES[model_type][1] else 0)),
            hf_config=raw,
        )

    def to_hf(self) -> dict[str, Any]:
        """config.json for export: the original file with our architecture fields written over it."""
        out = {k: v for k, v in self.hf_config.items() if k not in ("_name_or_path", "torch_dtype", "dtype")}
        out.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id,
            hidden_act="gelu",
            position_embedding_type="absolute",
            torch_dtype="float32",
        )
        return out


def local_max_length(model_name: str) -> tuple[int, str] | None:
    """(max sequence length, config.json path) of a model folder or an already downloaded hub id, without
    loading weights; None when its config.json is not on this machine (`load_dual_encoder` checks the lengths
    after the download)."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
    else:
        try:
            cached = huggingface_hub.try_to_load_from_cache(model_name, "config.json")
        except Exception:  # not a valid repo id, or no hub library: nothing to check against here
            return None
        if not isinstance(cached, str):
            return None
        cfg_file = Path(cached)
    if not cfg_file.is_file():
        return None
    return read_hf_config(cfg_file).max_length, str(cfg_file)
