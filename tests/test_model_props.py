"""Properties of the encoder and dual encoder that parity alone does not show.

Sharding metadata and sharded execution, tied vs untied towers, padding invariance, leading batch axes,
bfloat16 compute, rematerialisation, pytorch_model.bin / prefixed checkpoints, and the loading errors.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from model_fixtures import encode_p, encode_q, model_config
from safetensors.numpy import load_file, save_file

from mlret.config import default_config
from mlret.models import LOGICAL_AXIS_NAMES, DualEncoder, EncoderConfig, Tied, Untied, load_dual_encoder

RULES = (("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("pos", None),
         ("type", None), ("norm", None))


@pytest.fixture(scope="module")
def bert(random_bert_path):
    return load_dual_encoder(model_config(random_bert_path), query_len=16, passage_len=32)


def test_every_param_has_logical_axes(bert):
    model, _ = bert
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.ndim, path
        assert set(axes) <= set(LOGICAL_AXIS_NAMES), (path, axes)
        assert var.get_value().dtype == jnp.float32


def test_partition_specs_and_sharded_forward(bert):
    """Another module can derive partition specs from the logical names; sharded = unsharded numerically."""
    model, tok = bert
    graphdef, state = nnx.split(model)
    with nnx.logical_axis_rules(RULES):
        specs = nnx.get_partition_spec(state)
    enc = specs["towers"]["encoder"]
    assert enc["embeddings"]["word"]["embedding"].get_value() == P("tensor", "fsdp")
    assert enc["layers"][0]["attention"]["query"]["kernel"].get_value() == P("fsdp", "tensor")
    assert enc["layers"][0]["attention"]["output"]["kernel"].get_value() == P("tensor", "fsdp")
    assert enc["layers"][1]["output"]["kernel"].get_value() == P("tensor", "fsdp")
    assert enc["embeddings"]["norm"]["scale"].get_value() == P(None)

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    sharded_state = jax.device_put(state, shardings)
    assert sharded_state["towers"]["encoder"]["embeddings"]["word"]["embedding"].get_value().sharding.spec == \
        P("tensor", "fsdp")
    b = tok.passages(["a b c", "a much longer sentence about sharding", "x", "y z"])
    want = np.asarray(encode_p(model, b["passage_ids"], b["passage_mask"]))
    with jax.set_mesh(mesh):
        got = np.asarray(encode_p(nnx.merge(graphdef, sharded_state), b["passage_ids"], b["passage_mask"]))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_tied_and_untied(random_bert_path, bert):
    tied, tok = bert
    untied, _ = load_dual_encoder(model_config(random_bert_path, tied=False), query_len=16, passage_len=32)
    assert isinstance(tied.towers, Tied) and tied.tied and isinstance(untied.towers, Untied) and not untied.tied
    n_tied = sum(x.size for x in jax.tree.leaves(nnx.state(tied, nnx.Param)))
    n_untied = sum(x.size for x in jax.tree.leaves(nnx.state(untied, nnx.Param)))
    assert n_untied == 2 * n_tied
    b = tok.queries(["where is the station", "hello"])
    q = np.asarray(encode_q(untied, b["query_ids"], b["query_mask"]))
    np.testing.assert_allclose(q, np.asarray(encode_q(tied, b["query_ids"], b["query_mask"])), atol=1e-6)
    np.testing.assert_allclose(q, np.asarray(encode_p(untied, b["query_ids"], b["query_mask"])), atol=1e-6)
    # The towers own separate buffers: changing the passage tower leaves the query tower alone.
    emb = untied.towers.passage.embeddings.word.embedding
    emb.set_value(emb.get_value() * 2.0)
    assert untied.towers.query.embeddings.word.embedding.get_value() is not emb.get_value()
    np.testing.assert_allclose(np.asarray(encode_q(untied, b["query_ids"], b["query_mask"])), q, atol=1e-6)
    assert np.abs(np.asarray(encode_p(untied, b["query_ids"], b["query_mask"])) - q).max() > 1e-3
    # Tied: one encoder object behind both names.
    assert tied.towers.query is tied.towers.passage


def test_padding_does_not_leak(random_xlmr_path):
    """A text's embedding is the same alone (short static length) and padded in a batch with a long text."""
    model, tok = load_dual_encoder(model_config(random_xlmr_path), query_len=8, passage_len=96)
    short, long = "Kurzer Satz.", "Ein sehr langer Satz mit vielen Wörtern, " * 8
    alone = tok.queries([short])
    batch = tok.passages([short, long])
    assert alone["query_mask"].sum() < 8 and batch["passage_mask"][1].sum() > 60
    a = np.asarray(encode_q(model, alone["query_ids"], alone["query_mask"]))[0]
    b = np.asarray(encode_p(model, batch["passage_ids"], batch["passage_mask"]))[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_leading_axes_and_bfloat16(random_bert_path):
    f32, tok = load_dual_encoder(model_config(random_bert_path), query_len=8, passage_len=24)
    bf16, _ = load_dual_encoder(model_config(random_bert_path, compute_dtype="bfloat16"), query_len=8,
                                passage_len=24)
    b = tok.passages(["eins", "zwei drei", "vier fünf sechs sieben", "acht", "neun zehn", "elf"])
    ids, mask = b["passage_ids"].reshape(3, 2, -1), b["passage_mask"].reshape(3, 2, -1)  # [B, G, L]
    grouped = np.asarray(encode_p(f32, ids, mask))
    flat = np.asarray(encode_p(f32, b["passage_ids"], b["passage_mask"]))
    assert grouped.shape == (3, 2, f32.embed_dim)
    np.testing.assert_allclose(grouped.reshape(6, -1), flat, atol=1e-6)
    low = encode_p(bf16, b["passage_ids"], b["passage_mask"])
    assert low.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    cos = (np.asarray(low) * flat).sum(-1)  # both L2-normalised
    assert cos.min() > 0.99 and np.abs(np.asarray(low) - flat).max() > 1e-6  # close, but really bfloat16


def test_remat_gives_same_gradients(random_bert_path):
    plain, tok = load_dual_encoder(model_config(random_bert_path), query_len=8, passage_len=16)
    remat, _ = load_dual_encoder(model_config(random_bert_path, remat=True), query_len=8, passage_len=16)
    b = tok.passages(["one two", "three four five"])

    @jax.jit
    def grads(model):
        def loss(m):
            e = m.encode_passage(b["passage_ids"], b["passage_mask"])
            return (e[0] * e[1]).sum()
        return nnx.grad(loss)(model)

    g1, g2 = grads(plain), grads(remat)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 0


def test_whole_config_and_lengths(random_bert_path):
    c = default_config()
    c.model.name = str(random_bert_path)
    c.data.query_len, c.data.passage_len = 12, 20
    model, tok = load_dual_encoder(c)
    assert (tok.query_len, tok.passage_len) == (12, 20)
    c.data.passage_len = 500
    with pytest.raises(ValueError, match="data.passage_len=500"):
        load_dual_encoder(c)


# ------------------------------------------------------------------------------------ other checkpoint layouts


def _copy(src, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def _embed(path, texts, **kw):
    model, tok = load_dual_encoder(model_config(path, **kw), query_len=16, passage_len=16)
    b = tok.queries(texts)
    return np.asarray(encode_q(model, b["query_ids"], b["query_mask"]))


TEXTS = ["first text", "second, longer text here"]


def test_pytorch_bin_and_prefixed_checkpoints(random_bert_path, tmp_path):
    import torch

    want = _embed(random_bert_path, TEXTS)
    tensors = load_file(str(random_bert_path / "model.safetensors"))
    # pytorch_model.bin (read with weights_only=True) under the "bert." prefix of a task-head checkpoint,
    # with an extra head tensor that must be ignored.
    binary = _copy(random_bert_path, tmp_path, "bin")
    (binary / "model.safetensors").unlink()
    state = {f"bert.{k}": torch.from_numpy(v) for k, v in tensors.items()}
    state["cls.predictions.bias"] = torch.zeros(30522)
    torch.save(state, binary / "pytorch_model.bin")
    np.testing.assert_allclose(_embed(binary, TEXTS), want, atol=1e-6)
    # Old TF-era LayerNorm names (gamma / beta).
    old = _copy(random_bert_path, tmp_path, "gamma")
    save_file({k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items()}, str(old / "model.safetensors"), metadata={"format": "pt"})
    np.testing.assert_allclose(_embed(old, TEXTS), want, atol=1e-6)


def test_error_unsupported_model_type(random_bert_path, tmp_path):
    bad = _copy(random_bert_path, tmp_path, "gpt")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'gpt2' is not supported") as e:
        _embed(bad, TEXTS)
    assert str(bad) in str(e.value)
    cfg["model_type"], cfg["hidden_act"] = "bert", "relu"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        EncoderConfig.from_hf(bad)


def test_error_missing_and_misshaped_tensor(random_bert_path, tmp_path):
    tensors = load_file(str(random_bert_path / "model.safetensors"))
    missing = _copy(random_bert_path, tmp_path, "missing")
    save_file({k: v for k, v in tensors.items() if k != "encoder.layer.1.attention.self.key.weight"},
              str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"missing tensor encoder\.layer\.1\.attention\.self\.key\.weight"):
        _embed(missing, TEXTS)
    shaped = _copy(random_bert_path, tmp_path, "shaped")
    bad = dict(tensors)
    bad["encoder.layer.0.intermediate.dense.weight"] = np.zeros((90, 48), np.float32)
    save_file(bad, str(shaped / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight has shape \(90, 48\) "
                                         r"but config\.json implies \(96, 48\)"):
        _embed(shaped, TEXTS)


def test_error_vocab_larger_than_embeddings(random_bert_path, tmp_path):
    small = _copy(random_bert_path, tmp_path, "small-vocab")
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (small / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(random_bert_path / "model.safetensors"))
    tensors["embeddings.word_embeddings.weight"] = tensors["embeddings.word_embeddings.weight"][:1000].copy()
    save_file(tensors, str(small / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tokenizer has 30522 tokens but the word-embedding matrix has 1000 rows"):
        _embed(small, TEXTS)


def test_error_pooler_pooling_without_pooler(random_bert_path, tmp_path):
    nopool = _copy(random_bert_path, tmp_path, "nopool")
    tensors = load_file(str(random_bert_path / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("pooler.")}, str(nopool / "model.safetensors"),
              metadata={"format": "pt"})
    np.testing.assert_allclose(_embed(nopool, TEXTS), _embed(random_bert_path, TEXTS), atol=1e-6)  # mean: fine
    with pytest.raises(ValueError, match="no pooler weights"):
        _embed(nopool, TEXTS, pooling="pooler")


def test_error_not_a_folder():
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        _embed("./no/such/model", TEXTS)
    with pytest.raises(TypeError, match="Tied"):
        DualEncoder(object())


def test_error_hub_id_unavailable(monkeypatch):
    """A hub id goes through huggingface_hub; offline (as in the tests) the failure names the config field."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"config\.model\.name='mlret-test/no-such-model'.*hub"):
        _embed("mlret-test/no-such-model", TEXTS)


def test_gelu_recomputing_its_derivative_equals_jax_gelu():
    """mlret.models.common.gelu (the backward pass recomputes the derivative from the input) gives the value and
    the gradient of `jax.nn.gelu(approximate=False)`, on both tails and around 0, and NaN gradients stay NaN."""
    from mlret.models.common import gelu

    x = jnp.linspace(-8.0, 8.0, 4097, dtype=jnp.float32).reshape(17, 241)
    g = jax.random.normal(jax.random.key(0), x.shape, jnp.float32)
    exact = lambda v: jax.nn.gelu(v, approximate=False)
    y, vjp = jax.jit(lambda v: jax.vjp(gelu, v))(x)
    y_ref, vjp_ref = jax.vjp(exact, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]), rtol=1e-6, atol=1e-7)
    assert np.isnan(np.asarray(vjp(g.at[3, 5].set(jnp.nan))[0])[3, 5])
