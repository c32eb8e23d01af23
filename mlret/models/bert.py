"""The BERT family (model types bert, xlm-roberta, roberta): post-LN encoders with absolute positions.

The config is `mlret.models.encoder_config.EncoderConfig`, the module `mlret.models.encoder.Encoder`; this module
holds the parameter table and the family records (`mlret.models.family`).
"""

from __future__ import annotations

from mlret.models.encoder import Encoder
from mlret.models.encoder_config import SUPPORTED_MODEL_TYPES, EncoderConfig
from mlret.models.family import Family, ParamRow


def param_rows(cfg: EncoderConfig, with_pooler: bool) -> list[ParamRow]:
    """(our parameter path, HF tensor name without prefix, transpose) for every encoder parameter (BertModel's
    state dict names; XLMRobertaModel and RobertaModel use the same)."""
    rows: list[ParamRow] = []

    def linear(ours: tuple, hf: str) -> None:
        rows.extend([ParamRow((*ours, "kernel"), f"{hf}.weight", True), ParamRow((*ours, "bias"), f"{hf}.bias")])

    def norm(ours: tuple, hf: str) -> None:
        rows.extend([ParamRow((*ours, "scale"), f"{hf}.weight"), ParamRow((*ours, "bias"), f"{hf}.bias")])

    rows.append(ParamRow(("embeddings", "word", "embedding"), "embeddings.word_embeddings.weight"))
    rows.append(ParamRow(("embeddings", "position", "embedding"), "embeddings.position_embeddings.weight"))
    if cfg.type_vocab_size > 0:
        rows.append(ParamRow(("embeddings", "token_type", "embedding"), "embeddings.token_type_embeddings.weight"))
    norm(("embeddings", "norm"), "embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        ours, hf = ("layers", i), f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            linear((*ours, "attention", name), f"{hf}.attention.self.{name}")
        linear((*ours, "attention", "output"), f"{hf}.attention.output.dense")
        norm((*ours, "attention_norm"), f"{hf}.attention.output.LayerNorm")
        linear((*ours, "intermediate"), f"{hf}.intermediate.dense")
        linear((*ours, "output"), f"{hf}.output.dense")
        norm((*ours, "output_norm"), f"{hf}.output.LayerNorm")
    if with_pooler:
        linear(("pooler",), "pooler.dense")
    return rows


def matmul_params(cfg: EncoderConfig) -> int:
    """Q, K, V, O (h x h each) and the two MLP matrices (h x i) per layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_layers * (4 * h * h + 2 * h * i)


FAMILIES = tuple(
    Family(model_type, EncoderConfig.read, Encoder, param_rows, anchor="embeddings.word_embeddings.weight",
           prefixes=("", "bert.", "roberta.", "model."), pooler_tensor="pooler.dense.weight",
           poolings=("cls", "mean", "pooler", "last"), matmul_params=matmul_params,
           describe="BERT / RoBERTa post-LN encoders")
    for model_type in SUPPORTED_MODEL_TYPES)
