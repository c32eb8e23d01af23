"""Encoder families (mlret.models.family): the registry, and the ModernBERT and Qwen3 families against
transformers' own PyTorch classes on tiny random checkpoints (tests/model_fixtures.py; float32, max-abs <= 1e-4).

ModernBERT: hidden states and cls / mean pooling equal ModernBertModel's; the local layer really attends within
its window (the same weights read as all-global differ); padded = packed. Qwen3: hidden states and last-token /
mean pooling equal Qwen3Model's with right and with left padding (Qwen3-Embedding's side); padded = packed; key /
value heads shard over the tensor axis when they divide and are replicated (an error above the threshold) when
they do not. Export: both load in transformers.AutoModel and sentence-transformers with the same embeddings,
Qwen3's instruction prompt excluded from pooling exactly as sentence-transformers' `include_prompt=False` reads
it. Training: a few steps of each family under the mesh rules on 8 simulated devices (fsdp x tensor), and the
smoke config end to end (`python -m mlret.train`, subprocess) on ModernBERT.
"""

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from model_fixtures import encode_p, encode_q, model_config
from scale_helpers import tiny_batch, tiny_config
from scale_runs import train_cmd
from sentence_transformers import SentenceTransformer

from mlret import flops, parallel
from mlret.data.packing import _pack_piece, rows_needed
from mlret.errors import ShardingError
from mlret.export import export_model
from mlret.models import DualEncoder, Tied, family_of, load_dual_encoder, read_hf_config, supported_model_types
from mlret.models.modernbert import ModernBert
from mlret.models.qwen3 import Qwen3, Qwen3Config
from mlret.step import build_train_step

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
TEXTS = ["hi", "Der Bahnhof wurde 1882 eröffnet und seitdem mehrfach umgebaut und erweitert.",
         "a somewhat longer sentence with many more words than the local window of eight tokens, " * 2, "x y z"]


def _hf_hidden(ref, ids, mask):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


_hidden = jax.jit(lambda m, i, k: m.towers.passage(i, k))


def _pack_texts(model, tok):
    """TEXTS packed into rows of 64 by mlret.data.packing's first-fit packer, and the same texts padded: the
    embeddings of both."""
    b = tok.passages(TEXTS)
    ids, mask = b["passage_ids"], b["passage_mask"]
    packed_ids, segs = _pack_piece(ids, mask, 0, rows_needed(mask, ids.shape[1]))
    assert (segs >= 0).sum(1).max() > mask.sum(1).max()  # some row really holds several texts
    packed = np.asarray(jax.jit(lambda m, i, s: m.encode_passage_packed(i, s, len(TEXTS)))(model, packed_ids, segs))
    return packed, np.asarray(encode_p(model, ids, mask))


# ---------------------------------------------------------------------------------------------- registry


def test_registry_lists_every_family_and_rejects_others(random_bert_path, tmp_path):
    assert supported_model_types()[:5] == ("bert", "xlm-roberta", "roberta", "modernbert", "qwen3")
    bad = tmp_path / "gpt"
    shutil.copytree(random_bert_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        read_hf_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and f"{bad}/config.json: model_type 'gpt2' is not supported" in msg
    assert "bert, xlm-roberta, roberta, modernbert, qwen3" in msg


# ---------------------------------------------------------------------------------------------- ModernBERT


@pytest.fixture(scope="module")
def modernbert(random_modernbert_path):
    return load_dual_encoder(model_config(random_modernbert_path, normalize=False), query_len=16, passage_len=48)


def test_modernbert_matches_transformers(random_modernbert_path, modernbert):
    model, tok = modernbert
    cfg = model.towers.query.cfg
    assert cfg.layer_types == ("full_attention", "sliding_attention") and cfg.window == 4
    assert not cfg.norm_bias and not cfg.attention_bias and not cfg.mlp_bias
    ref = transformers.ModernBertModel.from_pretrained(random_modernbert_path).eval()
    b = tok.passages(TEXTS)
    ids, mask = b["passage_ids"], b["passage_mask"]
    assert mask.sum(1).max() > 20  # longer than the local window
    h_ref = _hf_hidden(ref, ids, mask)
    real = mask.astype(bool)
    hdiff = np.abs(np.asarray(_hidden(model, ids, mask)) - h_ref)[real].max()
    m3 = mask[..., None].astype(np.float32)
    pdiff = np.abs(np.asarray(encode_p(model, ids, mask)) - (h_ref * m3).sum(1) / m3.sum(1)).max()
    cls, _ = load_dual_encoder(model_config(random_modernbert_path, pooling="cls", normalize=False), query_len=16,
                               passage_len=48)
    cdiff = np.abs(np.asarray(encode_p(cls, ids, mask)) - h_ref[:, 0]).max()
    print(f"random ModernBERT vs ModernBertModel: hidden {hdiff:.2e}, mean {pdiff:.2e}, cls {cdiff:.2e}")
    assert max(hdiff, pdiff, cdiff) <= TOL


@pytest.mark.parametrize("family", ["modernbert", "qwen3"])
def test_bias_flags_match_transformers(family, random_modernbert_path, random_qwen3_path, tmp_path):
    """The same checkpoints with every bias the config flags allow (ModernBERT norm / attention / MLP biases,
    Qwen3 attention biases), randomised: the fused and per-head bias layouts map as the kernels do."""
    from model_fixtures import _perturb_norms_

    src = random_modernbert_path if family == "modernbert" else random_qwen3_path
    cls = transformers.ModernBertModel if family == "modernbert" else transformers.Qwen3Model
    raw = json.loads((src / "config.json").read_text())
    raw.update(attention_bias=True)
    if family == "modernbert":
        raw.update(norm_bias=True, mlp_bias=True)
    torch.manual_seed(1)
    ref = cls(cls.config_class.from_dict(raw)).eval()
    _perturb_norms_(ref, 5)  # biases are 1-D: randomised too
    folder = tmp_path / family
    ref.save_pretrained(folder, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.txt", "special_tokens_map.json"):
            shutil.copy(f, folder / f.name)
    model, tok = load_dual_encoder(model_config(folder, normalize=False), query_len=16, passage_len=48)
    cfg = model.towers.query.cfg
    assert cfg.attention_bias and (family == "qwen3" or (cfg.norm_bias and cfg.mlp_bias))
    b = tok.passages(TEXTS)
    real = b["passage_mask"].astype(bool)
    diff = np.abs(np.asarray(_hidden(model, b["passage_ids"], b["passage_mask"]))
                  - _hf_hidden(ref, b["passage_ids"], b["passage_mask"]))[real].max()
    print(f"{family} with biases vs transformers: hidden {diff:.2e}")
    assert diff <= TOL


def test_modernbert_local_attention_is_local(random_modernbert_path, modernbert, tmp_path):
    """Read from an old-style config (the pattern from global_attn_every_n_layers), the states are the same; read
    with every layer global, the long text's differ beyond the parity tolerance while the short one's (all within
    the window) do not: the window is applied where, and only where, the config says."""
    model, tok = modernbert
    b = tok.passages(TEXTS)
    want = np.asarray(_hidden(model, b["passage_ids"], b["passage_mask"]))
    raw = json.loads((random_modernbert_path / "config.json").read_text())

    def hidden_with(name, **fields):
        folder = tmp_path / name
        shutil.copytree(random_modernbert_path, folder)
        cfg = {k: v for k, v in raw.items() if k != "layer_types"}
        cfg.update(fields)
        (folder / "config.json").write_text(json.dumps(cfg))
        other, _ = load_dual_encoder(model_config(folder, normalize=False), query_len=16, passage_len=48)
        return np.asarray(_hidden(other, b["passage_ids"], b["passage_mask"]))

    real = b["passage_mask"].astype(bool)
    legacy = hidden_with("legacy", global_attn_every_n_layers=2)
    assert np.abs(legacy - want)[real].max() <= 1e-6
    # One rope theta for both kinds of layer, so that only the window differs between the two readings.
    theta = {k: {"rope_type": "default", "rope_theta": 10000.0} for k in ("full_attention", "sliding_attention")}
    local = hidden_with("local", layer_types=["full_attention", "sliding_attention"], rope_parameters=theta)
    glob = hidden_with("global", layer_types=["full_attention", "full_attention"], rope_parameters=theta)
    gap_long = np.abs(glob - local)[2][real[2]].max()
    gap_short = np.abs(glob - local)[0][real[0]].max()  # [CLS] hi [SEP]: every key within 4 tokens
    print(f"all-global vs local reading: long text {gap_long:.2e}, short text {gap_short:.2e}")
    assert gap_long > 10 * TOL, gap_long  # the all-global reading would fail the parity test above
    assert gap_short <= 1e-6, gap_short


def test_modernbert_padded_equals_packed(modernbert):
    model, tok = modernbert
    packed, padded = _pack_texts(model, tok)
    assert np.abs(packed - padded).max() <= 1e-5


# ---------------------------------------------------------------------------------------------- Qwen3


@pytest.fixture(scope="module")
def qwen3(random_qwen3_path):
    return load_dual_encoder(model_config(random_qwen3_path, pooling="last", normalize=False), query_len=16,
                             passage_len=48)


def test_qwen3_matches_transformers_right_and_left_padding(random_qwen3_path, qwen3):
    model, tok = qwen3
    cfg = model.towers.query.cfg
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    ref = transformers.Qwen3Model.from_pretrained(random_qwen3_path).eval()
    assert tok.hf.padding_side == "left"
    b = tok.passages(TEXTS)  # mlret pads on the right whatever the tokenizer's side
    ids, mask = b["passage_ids"], b["passage_mask"]
    assert mask[:, 0].all() and not mask[:, -1].all()
    h_ref = _hf_hidden(ref, ids, mask)
    real = mask.astype(bool)
    ours = np.asarray(_hidden(model, ids, mask))
    hdiff = np.abs(ours - h_ref)[real].max()
    last = mask.sum(1) - 1
    ldiff = np.abs(np.asarray(encode_p(model, ids, mask)) - h_ref[np.arange(len(TEXTS)), last]).max()
    # Left padding (what sentence-transformers does with this tokenizer): HF numbers positions from the row start,
    # mlret from each text's first token; rotary attention sees only differences, so the states agree.
    left = tok.hf(TEXTS, padding="max_length", max_length=48, truncation=True, return_tensors="np")
    lids, lmask = left["input_ids"].astype(np.int32), left["attention_mask"].astype(np.int32)
    assert not lmask[:, 0].all() and lmask[:, -1].all()
    h_left = _hf_hidden(ref, lids, lmask)
    ours_left = np.asarray(_hidden(model, lids, lmask))
    lhdiff = np.abs(ours_left - h_left)[lmask.astype(bool)].max()
    left_pooled = np.asarray(encode_p(model, lids, lmask))
    lpdiff = np.abs(left_pooled - h_left[:, -1]).max()
    mean, _ = load_dual_encoder(model_config(random_qwen3_path, pooling="mean", normalize=False), query_len=16,
                                passage_len=48)
    m3 = mask[..., None].astype(np.float32)
    mdiff = np.abs(np.asarray(encode_p(mean, ids, mask)) - (h_ref * m3).sum(1) / m3.sum(1)).max()
    print(f"random Qwen3 vs Qwen3Model: hidden {hdiff:.2e} (right padding) {lhdiff:.2e} (left), last-token "
          f"{ldiff:.2e} (right) {lpdiff:.2e} (left), mean {mdiff:.2e}")
    assert max(hdiff, ldiff, lhdiff, lpdiff, mdiff) <= TOL
    # Padding side does not change mlret's embeddings.
    assert np.abs(left_pooled - np.asarray(encode_p(model, ids, mask))).max() <= 1e-5


def test_qwen3_padded_equals_packed(qwen3):
    model, tok = qwen3
    packed, padded = _pack_texts(model, tok)
    assert np.abs(packed - padded).max() <= 1e-5


def test_qwen3_kv_heads_shard_over_tensor_when_they_divide(caplog):
    """kv kernels [embed, kv_heads, head_dim] carry `kv`: tensor=2 splits 2 kv heads; tensor=4 cannot, so they
    stay replicated with a warning, and the trainer refuses it above the replicated-parameter threshold."""
    cfg = Qwen3Config.read({"model_type": "qwen3", "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                            "intermediate_size": 128, "max_position_embeddings": 64}, "test")
    with nnx.use_eager_sharding(False):
        model = DualEncoder(Tied(Qwen3(cfg, rngs=nnx.Rngs(0))), pooling="last")
    c = tiny_config((2, 2, 2))
    rules = parallel.parse_rules(c.mesh.rules)
    state = nnx.state(model, nnx.Param)
    specs = parallel.state_shardings(state, parallel.make_mesh(c.mesh), rules)
    attn = specs["towers"]["encoder"]["layers"][0]["attn"]
    assert attn["k"]["kernel"].spec == P("fsdp", "tensor", None)
    assert attn["v"]["kernel"].spec == P("fsdp", "tensor", None)
    assert attn["q"]["kernel"].spec == P("fsdp", "tensor", None)
    c = tiny_config((2, 1, 4))
    with caplog.at_level(logging.WARNING, logger="mlret.parallel"):
        specs = parallel.state_shardings(state, parallel.make_mesh(c.mesh), rules)
    attn = specs["towers"]["encoder"]["layers"][0]["attn"]
    assert attn["k"]["kernel"].spec == P(None, None, None)  # 2 kv heads do not split over 4: replicated
    assert attn["q"]["kernel"].spec == P(None, "tensor", None)
    assert "(kv, size 2) is not divisible by mesh axes ('tensor',) (4)" in caplog.text
    c.mesh.replicated_param_threshold = 64 * 2 * 16 - 1
    with pytest.raises(ShardingError, match=r"\['k'\]\['kernel'\] \(64, 2, 16\) logical \('embed', 'kv', None\): "
                                            r"rules shard .*kv->tensor"):
        build_train_step(model, c, parallel.make_mesh(c.mesh))


# ---------------------------------------------------------------------------------------------- export


def test_modernbert_export_loads_and_matches(random_modernbert_path, tmp_path):
    cfg = model_config(random_modernbert_path, query_prefix="query: ", passage_prefix="passage: ")
    model, tok = load_dual_encoder(cfg, query_len=64, passage_len=48)  # no query truncated (as in the export)
    out = export_model(model, tok, cfg, tmp_path / "modernbert")
    st = SentenceTransformer(str(out), device="cpu")
    b = tok.queries(TEXTS[:3])
    mine = np.asarray(encode_q(model, b["query_ids"], b["query_mask"]))
    d_st = np.abs(st.encode_query(TEXTS[:3], convert_to_numpy=True) - mine).max()
    auto, info = transformers.AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert type(auto).__name__ == "ModernBertModel" and not info["missing_keys"] and not info["unexpected_keys"]
    h = _hf_hidden(auto.eval(), b["query_ids"], b["query_mask"])
    m3 = b["query_mask"][..., None].astype(np.float32)
    e = (h * m3).sum(1) / m3.sum(1)
    d_auto = np.abs(e / np.linalg.norm(e, axis=-1, keepdims=True) - mine).max()
    print(f"ModernBERT export: SentenceTransformer {d_st:.2e}, AutoModel {d_auto:.2e}")
    assert d_st <= TOL and d_auto <= TOL
    again, tok2 = load_dual_encoder(model_config(out), query_len=64, passage_len=48)
    same = export_model(again, tok2, model_config(out), tmp_path / "again")
    assert json.loads((out / "config.json").read_text()) == json.loads((same / "config.json").read_text())


@pytest.mark.parametrize("include_prompt", [True, False], ids=["prompt-pooled", "prompt-excluded"])
def test_qwen3_export_with_instruction_prompt(random_qwen3_path, tmp_path, include_prompt):
    """Mean pooling with an instruction prompt: sentence-transformers reads `include_prompt` from 1_Pooling and
    gives mlret's embeddings either way (the prompt's tokens counted as it counts them); last-token pooling too."""
    prompt = "Instruct: Given a question, retrieve passages that answer it\nQuery: "
    queries = ["wo ist der bahnhof?", "what is a fox?", "a much longer question about the history of the station"]
    cfg = model_config(random_qwen3_path, pooling="mean", query_prefix=prompt, include_prompt=include_prompt)
    model, tok = load_dual_encoder(cfg, query_len=40, passage_len=48)
    assert model.prompt_lengths[0] == (0 if include_prompt else len(tok.hf(prompt)["input_ids"]) - 1)
    out = export_model(model, tok, cfg, tmp_path / "qwen3")
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["include_prompt"] is include_prompt and pooling["pooling_mode_mean_tokens"]
    st = SentenceTransformer(str(out), device="cpu")
    st.max_seq_length = 40
    b = tok.queries(queries)
    mine = np.asarray(encode_q(model, b["query_ids"], b["query_mask"]))
    d = np.abs(st.encode_query(queries, convert_to_numpy=True) - mine).max()
    print(f"Qwen3 export, mean pooling, include_prompt={include_prompt}: SentenceTransformer {d:.2e}")
    assert d <= TOL
    other, _ = load_dual_encoder(model_config(random_qwen3_path, pooling="mean", query_prefix=prompt,
                                              include_prompt=not include_prompt), query_len=40, passage_len=48)
    assert np.abs(np.asarray(encode_q(other, b["query_ids"], b["query_mask"])) - mine).max() > 1e-3
    if include_prompt:  # last-token pooling, the Qwen3-Embedding recipe, through the same export
        cfg = model_config(random_qwen3_path, pooling="last", query_prefix=prompt)
        last, tok = load_dual_encoder(cfg, query_len=40, passage_len=48)
        out = export_model(last, tok, cfg, tmp_path / "qwen3-last")
        assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_lasttoken"]
        assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3Model"]
        st = SentenceTransformer(str(out), device="cpu")
        st.max_seq_length = 40
        mine = np.asarray(encode_q(last, b["query_ids"], b["query_mask"]))
        d = np.abs(st.encode_query(queries, convert_to_numpy=True) - mine).max()
        print(f"Qwen3 export, last-token pooling: SentenceTransformer {d:.2e} (tokenizer pads left)")
        assert d <= TOL


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("family", ["modernbert", "qwen3"])
def test_trains_under_the_mesh_rules(family, random_modernbert_path, random_qwen3_path):
    """Three AdamW steps on a (data 2, fsdp 2, tensor 2) mesh of 8 simulated devices: every large matrix sharded
    as the rules say (the trainer checks), the loss finite and falling; the FLOP formula below XLA's count."""
    path = random_modernbert_path if family == "modernbert" else random_qwen3_path
    model, _ = load_dual_encoder(model_config(path, pooling="mean" if family == "modernbert" else "last"),
                                 query_len=8, passage_len=8)
    c = tiny_config((2, 2, 2), steps=3)
    c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 0
    trainer, params = build_train_step(model, c, parallel.make_mesh(c.mesh))
    state = trainer.init_state(params)
    qkv = state["params"]["model"]["towers"]["encoder"]["layers"][0]["attn"]
    qkv = qkv["qkv"]["kernel"] if family == "modernbert" else qkv["k"]["kernel"]
    assert not qkv.sharding.is_fully_replicated
    batch = tiny_batch(0, batch=8, group=2, vocab=1000)
    losses = []
    for _ in range(3):
        state, metrics = trainer.step(state, trainer.global_batch(batch))
        losses.append(float(metrics["loss"]))
    print(f"{family}: losses {losses}")
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    cfg = model.towers.query.cfg
    assert family_of(cfg).name == family and flops.train_step_flops(cfg, 8, 2, 8, 8) > 0


def test_flop_formula_is_the_bulk_of_xlas_count():
    """The forward pass's matmul count from each new family's record against XLA's own count (hidden 128)."""
    from mlret.models.modernbert import ModernBertConfig

    mb = ModernBertConfig.read({"model_type": "modernbert", "vocab_size": 64, "hidden_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                                "local_attention": 8}, "test")
    qw = Qwen3Config.read({"model_type": "qwen3", "vocab_size": 64, "hidden_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                           "intermediate_size": 256}, "test")
    for cfg, module in ((mb, ModernBert), (qw, Qwen3)):
        with nnx.use_eager_sharding(False):
            enc = module(cfg, rngs=nnx.Rngs(0))
        ids = jax.ShapeDtypeStruct((4, 32), np.int32)
        cost = jax.jit(lambda m, i, k: m(i, k)).lower(enc, ids, ids).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        ours, xla = flops.encoder_forward_flops(cfg, 4, 32), float(cost["flops"])
        print(f"{cfg.model_type}: formula {ours:.4g}, XLA {xla:.4g} ({ours / xla:.1%})")
        assert 0.8 * xla <= ours <= xla, (cfg.model_type, ours, xla)


def test_smoke_config_trains_modernbert(random_modernbert_path, shared_data, tmp_path):
    """configs/smoke.py end to end (MLQA-R units, 8 simulated devices, fsdp 2 x tensor 2) on the random
    ModernBERT, a few steps: the run finishes and its losses are finite."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = train_cmd(tmp_path / "run", [f"--config.model.name={random_modernbert_path}",
                                       f"--config.data.data_dir={shared_data}",
                                       f"--config.data.tfds_dir={tmp_path / 'tfds'}", "--config.data.global_batch=8",
                                       "--config.data.query_len=16", "--config.data.passage_len=32",
                                       "--config.train.steps=4", "--config.optim.warmup_steps=1",
                                       "--config.train.log_every=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                                       "--config.checkpoint.every=4"])
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "finished at step 4" in run.stdout
    from mlret.metrics_log import read_metrics

    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
