"""The model side of mlret: tokenizer, Flax NNX dual encoder, Hugging Face weight import.

See docs/architecture.md ("Model") for the contracts and the logical axis names of the parameters.
"""

from mlret.models.dual_encoder import POOLING_MODES, DualEncoder, Tied, Untied, l2_normalize, mean_pool
from mlret.models.encoder import LOGICAL_AXIS_NAMES, Encoder
from mlret.models.encoder_config import SUPPORTED_MODEL_TYPES, EncoderConfig
from mlret.models.family import Family, ParamRow, family_of, read_hf_config, register, supported_model_types
from mlret.models.hf_weights import (
    encoder_from_tensors,
    encoder_to_tensors,
    load_dual_encoder,
    load_encoder,
    param_mapping,
    read_hf_tensors,
    resolve_model_dir,
)
from mlret.models.tokenizer import TextTokenizer

__all__ = [
    "DualEncoder", "Encoder", "EncoderConfig", "Family", "LOGICAL_AXIS_NAMES", "POOLING_MODES", "ParamRow",
    "SUPPORTED_MODEL_TYPES", "TextTokenizer", "Tied", "Untied", "encoder_from_tensors", "encoder_to_tensors",
    "family_of", "l2_normalize", "load_dual_encoder", "load_encoder", "mean_pool", "param_mapping", "read_hf_config",
    "read_hf_tensors", "register", "resolve_model_dir", "supported_model_types",
]
