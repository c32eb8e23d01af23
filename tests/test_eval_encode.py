"""Sharded encoding on 8 simulated devices (padding, length buckets, packed rows) and the evaluation CLI end to
end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from scale_runs import free_port, run_together

from mlret import parallel
from mlret.config import default_config
from mlret.eval.encode import ShardedEmbedder, bucket_length, place_model
from mlret.models import load_dual_encoder

REQUIRED = {"mono_map", "cross_map", "multi_map", "mono_r1", "cross_r1", "multi_r10", "mrr", "rank_distance"}


@pytest.fixture(scope="module")
def tiny(random_bert_path):
    c = default_config()
    c.model.name = str(random_bert_path)
    model, tok = load_dual_encoder(c.model, query_len=16, passage_len=48)
    return model, tok


def test_sharded_embedder_equals_unsharded_encoding(tiny, xquad_sentences):
    model, tok = tiny
    c = default_config()
    c.mesh.fsdp, c.mesh.tensor = 2, 2
    mesh = parallel.make_mesh(c.mesh)
    rules = parallel.parse_rules(c.mesh.rules)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    texts = list(xquad_sentences[:37])  # not a multiple of the batch: the last batch is padded
    b = tok.passages(texts)
    want = np.asarray(jax.jit(lambda m, i, k: m.encode_passage(i, k))(model, b["passage_ids"], b["passage_mask"]))
    placed = place_model(model, mesh, rules)
    for packing, buckets in ((False, True), (False, False), (True, True)):
        # pack_tokens=192: 4 rows of 48 tokens a call (one per data-parallel device), so texts span many calls
        emb = ShardedEmbedder(placed, tok, mesh, rules, batch_size=10, progress=False, length_buckets=buckets,
                              packing=packing, pack_tokens=192)
        assert emb.batch_size == 12  # rounded up to the 4 data-parallel devices
        got = emb.passages(texts)
        np.testing.assert_allclose(got, want, atol=2e-5)
        lengths = {n for tower, n in emb.lengths_used if tower == "passage"}
        if packing:
            # rows split over the 4 devices, a row of width w holds texts of up to w / 2 tokens (w < 48) or one
            # longer text, several texts to a row: fewer rows than texts
            assert all(rows % 4 == 0 and rows * w <= 192 for _, (rows, w) in emb.shapes_used)
            assert min(lengths) < 48 and sum(rows for _, (rows, _) in emb.shapes_used) < len(texts)
        else:
            assert emb.steps_run == 4
            if buckets:
                assert min(lengths) < 48  # short sentences ran at a shorter length, with the same embeddings
            else:
                assert lengths == {48}
    q = tok.queries(texts[:5])
    want_q = np.asarray(jax.jit(lambda m, i, k: m.encode_query(i, k))(model, q["query_ids"], q["query_mask"]))
    np.testing.assert_allclose(emb.queries(texts[:5]), want_q, atol=2e-5)


def test_packed_minilm_embeddings_and_xquad_metrics_equal_the_padded_ones(minilm_path, shared_data):
    """Real all-MiniLM-L6-v2 on an XQuAD-R slice (3 languages, 3 paragraphs each): packed rows give the padded
    batches' embeddings to float32 rounding (max abs diff <= 1e-5) and the LAReQA metrics to 1e-6."""
    from mlret.eval import lareqa

    c = default_config()
    c.model.name = str(minilm_path)
    model, tok = load_dual_encoder(c.model, query_len=128, passage_len=128)
    mesh = parallel.make_mesh(c.mesh, jax.devices()[:2])  # rows split over devices; 2 of them suffice
    rules = parallel.parse_rules(c.mesh.rules)
    placed = place_model(model, mesh, rules)
    langs = lareqa.load(str(shared_data / "xquad-r"), ["en", "de", "zh"], max_paragraphs=3)
    questions = {x: v.questions for x, v in langs.items()}
    sentences = {x: v.sentences for x, v in langs.items()}
    summaries, embeddings = [], []
    for packing in (True, False):
        emb = ShardedEmbedder(placed, tok, mesh, rules, batch_size=64, progress=False, packing=packing)
        q = {x: emb.queries(t) for x, t in questions.items()}
        s = {x: emb.passages(t) for x, t in sentences.items()}
        embeddings.append(np.concatenate([*q.values(), *s.values()]))
        summaries.append(lareqa.evaluate_embeddings(langs, q, s).summary)
        assert {n for _, n in emb.lengths_used} <= {16, 32, 64, 128}
    assert np.abs(embeddings[0] - embeddings[1]).max() <= 1e-5
    assert summaries[0].keys() == summaries[1].keys()
    for key, value in summaries[0].items():
        assert abs(value - summaries[1][key]) <= 1e-6, key


@pytest.mark.parametrize("family, pooling", [("modernbert", "mean"), ("qwen3", "last")])
def test_packed_encoding_of_every_family_equals_padded(request, family, pooling, xquad_sentences):
    """ModernBERT (local attention windows) and Qwen3 (causal, left padding, last-token pooling) encode packed
    rows through their own packed path with the padded path's embeddings (BERT: the test above)."""
    from model_fixtures import model_config

    from mlret.eval.encode import packed_path

    path = request.getfixturevalue(f"random_{family}_path")
    model, tok = load_dual_encoder(model_config(path, pooling=pooling), query_len=16, passage_len=48)
    assert packed_path(model) is None
    c = default_config()
    mesh = parallel.make_mesh(c.mesh)
    rules = parallel.parse_rules(c.mesh.rules)
    placed = place_model(model, mesh, rules)
    texts = list(xquad_sentences[:40])
    got = {}
    for packing in (True, False):
        emb = ShardedEmbedder(placed, tok, mesh, rules, batch_size=16, progress=False, packing=packing)
        got[packing] = emb.passages(texts)
        assert emb.packing == packing
    np.testing.assert_allclose(got[True], got[False], atol=2e-5)


def test_bucket_length():
    assert [bucket_length(n, 48) for n in (1, 16, 17, 33, 48)] == [16, 16, 32, 48, 48]


def test_evaluate_with_hf_model_writes_the_report(random_bert_path, shared_data, tmp_path):
    from mlret.evaluate import evaluate

    c = default_config()
    c.data.data_dir = str(shared_data)
    c.data.query_len, c.data.passage_len = 16, 48
    c.eval.evaluators = "xquad_r,tatoeba"
    c.eval.xquad_r.languages = "en,de,zh"
    c.eval.xquad_r.max_paragraphs = 2
    c.eval.tatoeba.languages = "deu"
    c.eval.tatoeba.max_sentences = 40
    c.eval.progress = False
    out = tmp_path / "r.json"
    evaluate(c, hf=str(random_bert_path), out=str(out))
    report = json.loads(out.read_text())
    assert REQUIRED <= set(report["results"]["xquad_r"]["summary"])
    assert report["summary"]["tatoeba"] == report["results"]["tatoeba"]["summary"]
    assert report["source"] == {"hf": str(random_bert_path)}
    assert all(0.0 <= v <= 1.0 for k, v in report["summary"]["xquad_r"].items() if "rank_distance" not in k)
    files = tmp_path / "r_files"
    assert (files / "xquad_r_matrices.json").exists() and (files / "xquad_r_pairs_map.png").exists()


def test_cli_rejects_bad_arguments(tmp_path):
    cmd = [sys.executable, "-m", "mlret.evaluate", "--out", str(tmp_path / "x.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "exactly one of --hf" in r.stderr
    r = subprocess.run(cmd + ["--hf", "x", "--checkpoint", "y"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "exactly one of --hf" in r.stderr


_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np

    port, pid, out, model_path, data_dir, texts_json = sys.argv[1:7]
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(pid), initialization_timeout=60,
                               heartbeat_timeout_seconds=30)
    from mlret import parallel
    from mlret.config import default_config
    from mlret.eval import build_evaluators, flat_metrics, run_evaluators
    from mlret.eval.encode import ShardedEmbedder, place_model
    from mlret.models import load_dual_encoder

    c = default_config()
    c.model.name = model_path
    c.mesh.fsdp, c.mesh.tensor = 2, 2
    c.data.data_dir = data_dir
    c.eval.xquad_r.languages = "en,de"
    c.eval.xquad_r.max_paragraphs = 2
    c.eval.plots = False
    model, tok = load_dual_encoder(c.model, query_len=16, passage_len=48)
    mesh = parallel.make_mesh(c.mesh)  # (2, 2, 2) over the 8 devices of both processes
    rules = parallel.parse_rules(c.mesh.rules)
    # Packed rows (the default): each process builds the same calls; two row widths (32, 48) shared by both towers
    # keep the compilations few.
    emb = ShardedEmbedder(place_model(model, mesh, rules), tok, mesh, rules, batch_size=12, progress=pid == "0",
                          length_buckets=False)
    texts = json.loads(texts_json)
    passages = emb.passages(texts)
    queries = emb.queries(texts[:5])
    metrics = flat_metrics(run_evaluators(build_evaluators(c), emb, step=0))
    np.savez(f"{out}.{pid}.npz", passages=passages, queries=queries, steps=emb.steps_run)
    with open(f"{out}.{pid}.json", "w") as f:
        json.dump(metrics, f)
""")


def test_two_processes_encode_like_one(tiny, random_bert_path, shared_data, xquad_sentences, tmp_path):
    """2 processes x 4 devices: both get every embedding, equal to one process's, and the same metrics."""
    model, tok = tiny
    texts = list(xquad_sentences[:37])
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "emb"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    port = free_port()
    procs = run_together([[sys.executable, str(script), str(port), str(i), str(out), str(random_bert_path),
                           str(shared_data), json.dumps(texts)] for i in range(2)], [env, env], 300,
                         tmp_path / "logs")
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    got = [np.load(f"{out}.{i}.npz") for i in range(2)]
    metrics = [json.loads(Path(f"{out}.{i}.json").read_text()) for i in range(2)]
    b = tok.passages(texts)
    want = np.asarray(jax.jit(lambda m, i, k: m.encode_passage(i, k))(model, b["passage_ids"], b["passage_mask"]))
    for g in got:
        np.testing.assert_allclose(g["passages"], want, atol=2e-5)
        assert int(g["steps"]) == int(got[0]["steps"])  # both stepped alike
    np.testing.assert_array_equal(got[0]["passages"], got[1]["passages"])
    np.testing.assert_array_equal(got[0]["queries"], got[1]["queries"])
    assert metrics[0] == metrics[1] and "xquad_r/multi_map" in metrics[0]
