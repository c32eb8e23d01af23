"""Ahead-of-time compilation for a real TPU topology (mlret/compile.py), with the XLA:TPU compiler of libtpu and no
TPU: the smoke config's train step compiled for a v5e 2x2 slice (4 chips).

Checked: the memory report (the train state's bytes are the arguments, donated and aliased to the outputs, the
total within the chip's HBM), the loss's gather of the passage embeddings in the compiled HLO (and no gather of
weights or activations), the compiler's FLOPs against mlret/flops.py (the formula counts matmuls only: the
compiler's count is at least it and at most 15% above it on MiniLM at these lengths; measured 1.05), the
evaluation encoder, and a config that cannot fit failing with the config fields to change. One compilation of
each program per session (about 40 s of the 2 cores here in all).

Needs libtpu (`pip install -e ".[tpu]"`, which .ci/run does); skipped, saying so, where it is not installed. The
rest of the suite stays on the CPU backend: topologies are compile-only devices, `jax.devices()` is unchanged.
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): no XLA:TPU compiler")

from conftest import REPO  # noqa: E402

from mlret import compile as C  # noqa: E402

TOPOLOGY = "v5e:2x2"
SMOKE = str(REPO / "configs" / "smoke.py")
# all-MiniLM-L6-v2 without its pooler (mean pooling builds none): float32, replicated (no fsdp), and AdamW keeps
# two moments of each: the train state is 3 x 4 bytes per parameter on every chip.
MINILM_PARAMS = 22_565_376
FLOP_TOLERANCE = 0.15  # compiler / formula in [1, 1.15]: elementwise work the formula leaves out


@pytest.fixture(scope="session")
def devices():
    return C.topology_devices(TOPOLOGY)


@pytest.fixture(scope="session")
def smoke_report(devices, tmp_path_factory):
    """The smoke config compiled for v5e:2x2, train step and evaluation encoder, with its HLO."""
    hlo = tmp_path_factory.mktemp("compile") / "step.hlo"
    config = C.load_config(SMOKE, [])
    report = C.check(config, TOPOLOGY, devices=devices, hlo_out=str(hlo))
    return config, report, hlo.read_text()


def test_devices_are_compile_only_and_the_backend_stays_cpu(devices):
    import jax

    assert len(devices) == 4 and devices[0].platform == "tpu"
    assert jax.default_backend() == "cpu"  # libtpu changes nothing for the rest of the suite


def test_memory_report(smoke_report):
    config, r, _ = smoke_report
    mem = r["memory"]
    assert r["chips"] == 4 and r["data_parallel"] == 4 and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    params = MINILM_PARAMS
    assert 3 * 4 * params <= mem["argument_bytes"] <= 3 * 4 * params * 1.02, mem
    # The state is donated: its outputs alias its arguments.
    assert mem["alias_bytes"] >= 0.99 * 3 * 4 * params, mem
    assert mem["temp_bytes"] > 0 and mem["generated_code_bytes"] > 0
    assert mem["total_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
                                  + mem["temp_bytes"] + mem["generated_code_bytes"])
    assert mem["hbm_bytes"] == 16 * 2**30 and mem["fits"] and 0 < mem["fraction_of_hbm"] < 0.1
    assert r["verdict"].startswith("fits")
    json.dumps(r)  # what --out writes


def test_loss_gathers_passage_embeddings_not_weights(smoke_report):
    config, r, hlo = smoke_report
    b, g, d = config.data.global_batch, config.data.group_size, 384
    gathers = [c for c in r["collectives"]["ops"] if c["kind"] == "all-gather"]
    assert gathers, "no all-gather in the compiled step: the loss does not see the global batch"
    # Every all-gather moves the passage embeddings of the whole batch [B*G, D] (in bf16: the TPU's default matmul
    # precision takes bf16 inputs, and XLA converts before gathering); none moves a weight or an activation.
    for c in gathers:
        assert c["what"] == "passage embeddings", c
        assert c["shape"].split("[")[1] == f"{b * g},{d}]", c
    assert r["loss_gather"]["other_gathers_per_step"] == 0
    # Pure data parallelism: the gradients are all-reduced once, all of them (float32, every parameter).
    reduced = r["collectives"]["by_kind"]["all-reduce"]["bytes_per_step"]
    assert reduced >= 4 * MINILM_PARAMS, r["collectives"]["by_kind"]
    assert "all-gather(" in hlo or "all-gather-start(" in hlo


def test_packed_batches_gather_the_passage_embeddings_once(devices, tmp_path):
    """Packed rows are pooled on each shard (mlret.data.packing puts a shard's texts in its own rows): the
    embeddings meet the loss's one gather of [B x G, D] and its backward, not an all-reduce of pooled sums. The
    small BERT of the fsdp test (hidden 128: no weight has the embeddings' shape) keeps the compilation short."""
    arch = tmp_path / "config.json"
    arch.write_text(json.dumps(dict(TINY_BERT, hidden_size=128, intermediate_size=256)))
    config = C.load_config(SMOKE, ["data.packing=True"])
    r = C.check(config, TOPOLOGY, devices=devices, model_config=str(arch), eval_step=False)
    assert "passage_segments" in r["batch_shapes"], r["batch_shapes"]  # the packed step
    b, g, d = config.data.global_batch, config.data.group_size, 128
    lg = r["loss_gather"]
    assert lg["embedding_gathers_per_step"] == 1 and lg["other_gathers_per_step"] == 0, lg
    assert [s.split("[")[1] for s in lg["embedding_gather_shapes"]] == [f"{b * g},{d}]"], lg
    # The gather's backward (TPU: an all-reduce of the gathered gradient) is the only embedding all-reduce.
    assert all(s.split("[")[1] == f"{b * g},{d}]" for s in lg["embedding_all_reduce_shapes"]), lg


def test_fsdp_gathers_weights_not_activations(devices, tmp_path):
    """mesh.fsdp=2 on v5e:2x2 (data 2 x fsdp 2): the encoders pin their hidden states to the batch sharding
    (mlret.models.common.constrain), so XLA gathers the fsdp-split weights and reduce-scatters their gradients,
    and moves no activation; the loss's gather of [B x G, D] is still the one gather of embeddings. (Unpinned, it
    split the activations along the hidden axis as the weights are and gathered them around every matmul.) A
    small BERT (2 layers, hidden 128: no text length) keeps the compilation to seconds."""
    arch = tmp_path / "config.json"
    arch.write_text(json.dumps(dict(TINY_BERT, hidden_size=128, intermediate_size=256)))
    config = C.load_config(SMOKE, ["mesh.fsdp=2"])
    r = C.check(config, TOPOLOGY, devices=devices, model_config=str(arch), eval_step=False)
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    ops = r["collectives"]["ops"]
    moved = [f"{c['kind']} {c['shape']}" for c in ops if c["what"] == "activations"]
    assert not moved, moved
    gathers = {c["what"] for c in ops if c["kind"] == "all-gather"}
    assert gathers == {"weights", "passage embeddings"}, gathers
    lg = r["loss_gather"]
    b, g = config.data.global_batch, config.data.group_size
    assert lg["embedding_gathers_per_step"] == 1 and [s.split("[")[1] for s in lg["embedding_gather_shapes"]] == [
        f"{b * g},128]"], lg
    scattered = [c for c in ops if c["kind"] == "reduce-scatter"]
    assert scattered and all(c["what"].startswith("weights") for c in scattered), scattered


def test_the_distillation_losses_compile_with_their_float_fields(devices, tmp_path):
    """A config whose loss reads the data's float fields (kl_distill's teacher scores per candidate,
    embed_distill's targets and mask) compiles for the TPU with the shapes and dtypes mlret.data.pipeline gives
    them (every field used to be one int32 per pair, which the losses cannot trace)."""
    arch = tmp_path / "config.json"
    arch.write_text(json.dumps(TINY_BERT))
    config = C.load_config(SMOKE, ["loss.terms=contrastive,kl_distill,embed_distill",
                                   "loss.embed_distill.teacher=an-english-teacher"])
    r = C.check(config, TOPOLOGY, devices=devices, model_config=str(arch), eval_step=False)
    b, g, d = config.data.global_batch, config.data.group_size, TINY_BERT["hidden_size"]
    shapes = r["batch_shapes"]
    assert shapes["teacher_scores"] == [b, g] and shapes["teacher_mask"] == [b], shapes
    assert shapes["teacher_query"] == shapes["teacher_passage"] == [b, d], shapes
    assert r["memory"]["fits"]


def test_flops_match_the_formula(smoke_report):
    _, r, _ = smoke_report
    fl = r["flops"]
    assert fl["expected_ratio"] == 1.0  # no remat, no gradient caching
    assert 1.0 <= fl["compiler_over_formula"] <= 1.0 + FLOP_TOLERANCE, fl
    roof = r["roofline"]
    assert roof["step_seconds_lower_bound"] == max(roof["compute_seconds"], roof["memory_seconds"]) > 0
    assert math.isclose(roof["examples_per_second_upper_bound"], 16 / roof["step_seconds_lower_bound"])
    assert 0 < roof["mfu_at_bound"] <= 1


def test_eval_encoder_compiles_and_fits_beside_the_state(smoke_report):
    config, r, _ = smoke_report
    ev = r["eval_encode"]
    # The encoder the run's evaluation calls: packed (config.eval.packing), its widest calls, PACK_TOKENS tokens
    # in rows of the eval length, a multiple of the 4 chips.
    from mlret.eval.encode import PACK_TOKENS

    length = config.eval.passage_len or config.data.passage_len
    assert config.eval.packing and (ev["layout"], ev["rows"], ev["length"]) == ("packed", PACK_TOKENS // length, length)
    assert ev["rows"] % 4 == 0 and ev["memory"]["total_bytes"] > 0 and ev["flops_per_chip"] > 0
    assert ev["with_train_state_bytes"] > r["memory"]["argument_bytes"] and ev["fits_beside_train_state"]


def test_a_config_that_cannot_fit_names_the_fields(devices):
    config = C.load_config(SMOKE, ["data.global_batch=16384"])
    with pytest.raises(C.DoesNotFit) as e:
        C.check(config, TOPOLOGY, devices=devices, eval_step=False)
    text = str(e.value)
    for field in ("train.grad_cache_chunk", "model.remat", "data.global_batch"):
        assert field in text, text


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "mlret.compile", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _last_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.startswith(C.PROG)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_cli_user_mistakes_are_one_line():
    bad = _cli("--config", SMOKE, "--topology", "v5litepod-16")
    assert bad.returncode == 2 and "--topology" in _last_line(bad.stderr)
    bad = _cli("--config", SMOKE, "--topology", TOPOLOGY, "--config.data.global_batch=18")
    assert bad.returncode == 2 and "config.data.global_batch" in _last_line(bad.stderr)


# ---------------------------------------------------------------------------------------------- the HLO reader

_HLO = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %ag = bf16[16,4]{1,0} all-gather(bf16[4,4]{1,0} %x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
}

ENTRY %main (a: f32[10,4], b: f32[3]) -> f32[10,4] {
  %ars = (f32[10,4]{1,0}, f32[3]{0}) all-reduce-start(f32[10,4]{1,0} %a, f32[3]{0} %b), channel_id=2, to_apply=%add
  %ard = (f32[10,4]{1,0}, f32[3]{0}) all-reduce-done(%ars)
  %w = (s32[], f32[8,4]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %ags = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) all-gather-start(bf16[2,4]{1,0} %y), channel_id=3, dimensions={0}
}
"""


def test_collectives_reader_counts_tuples_async_pairs_and_loop_trips():
    ops = C.collectives(_HLO)
    by = {o["name"]: o for o in ops}
    assert set(by) == {"ag", "ars", "ags"}  # a -done is not a second collective
    assert by["ars"]["bytes"] == 4 * (40 + 3) and by["ars"]["arrays"] == 2  # the combined gradients' all-reduce
    assert by["ags"]["bytes"] == 2 * 32  # an async start: its outputs, not its operands
    assert by["ag"]["runs_per_step"] == 6 and by["ag"]["computation"] == "body"
    summary = C.summarise_collectives(ops)
    assert summary["all-gather"] == {"count": 7, "bytes_per_step": 6 * 2 * 64 + 64}


# XLA:TPU's reduce-scatters: fusions calling `all-reduce-scatter.N` computations, whose all-reduces all say channel 1.
_HLO_RS = """HloModule m

%all-reduce-scatter.1 (input_0: f32[8,4], input_1: f32[4]) -> (f32[4,4], f32[2]) {
  %ar = (f32[8,4]{1,0}, f32[4]{0}) all-reduce(f32[8,4]{1,0} %input_0, f32[4]{0} %input_1), channel_id=1, to_apply=%add
}

%all-reduce-scatter.2 (input_0: f32[8,4]) -> (f32[4,4]) {
  %ar = (f32[8,4]{1,0}) all-reduce(f32[8,4]{1,0} %input_0), channel_id=1, to_apply=%add
}

ENTRY %main (a: f32[8,4], b: f32[4]) -> f32[4,4] {
  %f1 = (f32[4,4]{1,0}, f32[2]{0}) fusion(%a, %b), kind=kCustom, calls=%all-reduce-scatter.1
  %f2 = (f32[4,4]{1,0}) fusion(%a), kind=kCustom, calls=%all-reduce-scatter.2
  %g = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %a), channel_id=1, to_apply=%add
}
"""


def test_collectives_reader_names_tpu_reduce_scatters():
    ops = C.collectives(_HLO_RS)
    scatters = sorted((o["computation"], o["shape"], o["bytes"]) for o in ops if o["kind"] == "reduce-scatter")
    # Two reduce-scatters (not one: they share channel 1), each of its computation's result, the devices' shards.
    assert scatters == [("all-reduce-scatter.1", "f32[4,4]", 4 * (16 + 2)), ("all-reduce-scatter.2", "f32[4,4]", 64)]
    assert [o["shape"] for o in ops if o["kind"] == "all-reduce"] == ["f32[8,4]"]


def test_an_embedding_with_a_weights_shape_is_the_loss_gather():
    """LaBSE at batch 256 x G = 2: the loss's [512, 768] is also the position table's shape. Alone it is the
    loss's gather (here lowered as an all-reduce); inside the combined gradient all-reduce it is the weight's."""
    config = C.load_config(SMOKE, ["data.global_batch=256"])
    arch = type("Arch", (), {"hidden_size": 768})
    ops = C.collectives(_HLO.replace("f32[10,4]", "f32[512,768]"))  # %ars: a tuple of [512, 768] and [3]
    ops.append(dict(ops[0], kind="all-reduce", dims=(512, 768), arrays=1, name="lone"))
    C.classify_gathers(ops, config, arch, {(512, 768)})
    what = {o["name"]: o["what"] for o in ops}
    assert what["lone"] == "passage embeddings" and what["ars"] == "weights or gradients", what


# ------------------------------------------------------------------------------------------- the batch finder

# A BERT small enough that one XLA:TPU compilation of its step takes seconds: the finder compiles several.
TINY_BERT = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 1000, "hidden_size": 32,
             "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
             "layer_norm_eps": 1e-12, "pad_token_id": 0}


def test_the_largest_batch_that_fits_fits_and_the_next_does_not(devices, tmp_path):
    """find_max_batch against an HBM budget set between the tiny model's compiled totals at batch 12 and 16 (one
    data-parallel unit apart, so that the search is short): from the smoke config's batch 16 it halves to 8, then
    bisects to 12; the batch it returns compiles within the budget, one more data-parallel unit does not."""
    arch = tmp_path / "config.json"
    arch.write_text(json.dumps(TINY_BERT))

    def total(batch: int, headroom: float = 0.1) -> dict:
        config = C.load_config(SMOKE, [f"data.global_batch={batch}"])
        return C.check(config, TOPOLOGY, model_config=str(arch), headroom=headroom, eval_step=False,
                       devices=devices)["memory"]

    low, high = total(12)["total_bytes"], total(16)["total_bytes"]
    assert low < high  # the step's memory grows with the batch
    hbm = 16 * 2**30
    headroom = 1 - (low + high) / 2 / hbm  # the budget lies between the two
    config = C.load_config(SMOKE, [])
    assert config.data.global_batch == 16  # the search starts above the answer: halving, then bisecting
    found = C.find_max_batch(config, TOPOLOGY, model_config=str(arch), headroom=headroom, limit=1024,
                             log=lambda _: None)
    best, unit = found["max_global_batch"], found["unit"]
    assert unit == 4 and best % unit == 0 and best == 12 and not found["hit_search_limit"], found
    assert [p["global_batch"] for p in found["probes"]] == [16, 8, 12], found["probes"]
    assert found["memory"]["fits"] and found["memory"]["total_bytes"] <= hbm * (1 - headroom)
    assert not total(best + unit, headroom)["fits"]
