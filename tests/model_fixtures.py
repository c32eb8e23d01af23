"""Session fixtures for the model / export tests: tiny random HF checkpoints made with transformers + torch.

Imported by tests/conftest.py so that every test module shares one instance of each (building and loading
them is what costs time). Configs are tiny except for the vocabulary, which the real tokenizers need.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import jax
import pytest
from ml_collections import ConfigDict

XLMR_TOKENIZER_CONFIG = {
    "tokenizer_class": "XLMRobertaTokenizerFast",
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "cls_token": "<s>",
    "pad_token": "<pad>", "mask_token": "<mask>", "model_max_length": 512,
}


def model_config(path, **kw) -> ConfigDict:
    """A `config.model` section for loading `path` (mean pooling, normalised, float32) with overrides."""
    c = dict(name=str(path), pooling="mean", normalize=True, query_prefix="", passage_prefix="", tied=True,
             compute_dtype="float32", param_dtype="float32", remat=False)
    c.update(kw)
    return ConfigDict(c)


@jax.jit
def encode_q(model, ids, mask):
    """The query tower's pooled embeddings (jitted: one compilation per model structure and shape)."""
    return model.encode_query(ids, mask)


@jax.jit
def encode_p(model, ids, mask):
    """The passage tower's pooled embeddings (jitted)."""
    return model.encode_passage(ids, mask)


def _perturb_(model, seed: int) -> None:
    """HF initialises LayerNorm to (1, 0) and biases to 0; randomise them so a mis-mapped one would show."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _save_xlmr_tokenizer(shared_data: Path, out: Path) -> None:
    src = shared_data / "tokenizers" / "multilingual-e5-small" / "tokenizer.json.gz"
    with gzip.open(src, "rb") as f_in, open(out / "tokenizer.json", "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
    (out / "tokenizer_config.json").write_text(json.dumps(XLMR_TOKENIZER_CONFIG, indent=2))


@pytest.fixture(scope="session")
def random_xlmr_path(tmp_path_factory, shared_data) -> Path:
    """A random 2-layer XLM-R (hidden 32) with the real XLM-R tokenizer (250,002 tokens), as safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.XLMRobertaConfig(
        vocab_size=250002, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        hidden_act="gelu", layer_norm_eps=1e-5)
    model = transformers.XLMRobertaModel(cfg).eval()
    _perturb_(model, 1)
    out = tmp_path_factory.mktemp("random-xlmr")
    model.save_pretrained(out, safe_serialization=True)
    _save_xlmr_tokenizer(shared_data, out)
    return out


@pytest.fixture(scope="session")
def random_bert_path(tmp_path_factory, minilm_path) -> Path:
    """A random 2-layer BERT with token types (3) and a pooler, MiniLM's WordPiece tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
        max_position_embeddings=128, type_vocab_size=3, pad_token_id=0, hidden_act="gelu")
    model = transformers.BertModel(cfg, add_pooling_layer=True).eval()
    _perturb_(model, 2)
    out = tmp_path_factory.mktemp("random-bert")
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(Path(minilm_path) / f, out / f)
    return out


@pytest.fixture(scope="session")
def xquad_sentences(shared_data) -> list[str]:
    """72 real sentences, 12 from each of 6 languages (Latin, Cyrillic, Arabic, Devanagari and Han scripts)."""
    out = []
    for lang in ("en", "de", "ru", "ar", "hi", "zh"):
        data = json.loads((shared_data / "xquad-r" / f"{lang}.json").read_text())
        sents = [s for art in data["data"] for p in art["paragraphs"] for s in p["sentences"]]
        out.extend(sents[:: max(1, len(sents) // 12)][:12])
    return out


def _perturb_norms_(model, seed: int) -> None:
    """Norm weights start at 1 (and biases at 0): randomise every 1-D parameter so a mis-mapped one would show."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _copy_wordpiece_tokenizer(minilm_path, out: Path, **tokenizer_config) -> None:
    for f in ("tokenizer.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(Path(minilm_path) / f, out / f)
    cfg = json.loads((Path(minilm_path) / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_config)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="session")
def random_modernbert_path(tmp_path_factory, minilm_path) -> Path:
    """A random 2-layer ModernBERT (hidden 64): layer 0 global, layer 1 local with an 8-token window (4 on either
    side), so texts longer than 5 tokens see the difference; MiniLM's WordPiece tokenizer (right padding)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0,
        bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102, hidden_activation="gelu")
    model = transformers.ModernBertModel(cfg).eval()
    _perturb_norms_(model, 3)
    out = tmp_path_factory.mktemp("random-modernbert")
    model.save_pretrained(out, safe_serialization=True)
    _copy_wordpiece_tokenizer(minilm_path, out)
    return out


@pytest.fixture(scope="session")
def random_qwen3_path(tmp_path_factory, minilm_path) -> Path:
    """A random 2-layer Qwen3 (hidden 64, 4 query heads over 2 kv heads, head_dim 16, q / k bias-free), with
    MiniLM's tokenizer set to pad on the left as Qwen3-Embedding's does ([SEP] plays the appended EOS)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0,
        tie_word_embeddings=False)
    model = transformers.Qwen3Model(cfg).eval()
    _perturb_norms_(model, 4)
    out = tmp_path_factory.mktemp("random-qwen3")
    model.save_pretrained(out, safe_serialization=True)
    _copy_wordpiece_tokenizer(minilm_path, out, padding_side="left")
    return out
