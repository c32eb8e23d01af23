"""Packed batches (mlret.data.packing): a packed batch gives the embeddings, loss and gradients of the same batch
padded to the maximum, on the real MiniLM weights and real MLQA-R texts, on one device and on a sharded mesh with
gradient caching; XLM-R's position offsets restart per segment; the layout is whole pieces of static shape."""

import jax
import numpy as np
import pytest
from model_fixtures import model_config
from scale_helpers import max_abs_diff

from mlret import parallel
from mlret.config import default_config
from mlret.data import packing, readers
from mlret.models import load_dual_encoder
from mlret.step import build_train_step

B, G, LQ, LP = 16, 2, 64, 192
MLQA = ("ar", "de", "en", "es", "hi", "vi", "zh")


@pytest.fixture(scope="module")
def mlqa_texts(shared_data):
    """B real MLQA-R pairs (question, answer sentence, one other sentence of the paragraph) over 7 languages."""
    units = readers.read_squad_sentences({lang: shared_data / "mlqa-r" / f"{lang}.json" for lang in MLQA},
                                         source="mlqa_r")
    texts = [(u.texts[lang], lang) for u in units[::37] for lang in sorted(u.texts)][: 5 * B: 5]
    queries = [t.query for t, _ in texts]
    groups = [[t.positive, t.negatives[0] if t.negatives else t.positive] for t, _ in texts]
    return queries, groups


def _config(path, *, packed: bool, mesh=(1, 1, 1), chunk: int = 0, pooling: str = "mean", lq=LQ, lp=LP):
    c = default_config()
    c.model.update(model_config(path, pooling=pooling))
    c.data.global_batch, c.data.group_size, c.data.query_len, c.data.passage_len = B, G, lq, lp
    c.data.packing = packed
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.train.grad_cache_chunk = chunk
    c.train.steps, c.optim.warmup_steps = 10, 2
    return c


def _batch(tok, texts):
    queries, groups = texts
    q, p = tok.queries(queries), tok.passages([t for g in groups for t in g])
    return {"query_ids": q["query_ids"], "query_mask": q["query_mask"],
            "passage_ids": p["passage_ids"].reshape(B, G, -1), "passage_mask": p["passage_mask"].reshape(B, G, -1),
            "unit_id": np.arange(B, dtype=np.int32)}


def _trainer(config, devices=None):
    """(trainer, its placed weights, tokenizer)."""
    model, tok = load_dual_encoder(config)
    trainer, params = build_train_step(model, config, parallel.make_mesh(config.mesh, devices))
    return (trainer, params), tok


def _embed(built, batch):
    """(query embeddings, passage embeddings)."""
    trainer, params = built
    emb = jax.device_get(jax.jit(trainer.embed)(params, trainer.global_batch(batch)))
    return emb["query"], emb["passage"]


def _grads(built, batch):
    trainer, params = built
    (loss, _), grads = trainer.grad_fn()(params, trainer.global_batch(batch))
    return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def padded(minilm_path, mlqa_texts):
    """Embeddings, loss and gradients of the padded batch on one device (the reference)."""
    t, tok = _trainer(_config(minilm_path, packed=False), jax.devices()[:1])
    batch = _batch(tok, mlqa_texts)
    return batch, _embed(t, batch), _grads(t, batch)


def test_first_fit_decreasing_places_every_text_once():
    lengths = np.array([5, 9, 3, 9, 1, 7, 2, 10])
    bins = packing.first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= 10 for b in bins)
    assert len(bins) == 5  # ceil(46 / 10) = 5: first-fit decreasing is optimal here
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 10\]"):
        packing.first_fit_decreasing(np.array([11]), 10)


def test_packed_rows_are_whole_pieces_of_static_shape(padded):
    batch = padded[0]
    layout = packing.Layout(shards=2, chunks=2, rows_multiple=2)
    out = packing.pack_batch(batch, layout, first_shard=0, global_pairs=B)
    rq, rp = out["query_ids"].shape[0] // 4, out["passage_ids"].shape[0] // 4
    assert rq % 2 == 0 and rp % 2 == 0 and rp * 4 < B * G  # fewer rows than texts: the packing packs
    per = B // 4
    for piece in range(4):  # piece (shard d, chunk c) holds exactly its pairs, indexed within the chunk
        d, c = divmod(piece, 2)
        seg_q = out["query_segments"][piece * rq:(piece + 1) * rq]
        seg_p = out["passage_segments"][piece * rp:(piece + 1) * rp]
        assert sorted(set(seg_q[seg_q >= 0].tolist())) == list(range(d * per, (d + 1) * per))
        assert sorted(set(seg_p[seg_p >= 0].tolist())) == list(range(d * per * G, (d + 1) * per * G))
        for j in range(per):  # each text's tokens, in order, in one row
            pair = d * 2 * per + c * per + j
            rows, cols = np.nonzero(seg_q == d * per + j)
            assert len(set(rows.tolist())) == 1
            ids = out["query_ids"][piece * rq:(piece + 1) * rq][rows, cols]
            np.testing.assert_array_equal(ids, batch["query_ids"][pair][batch["query_mask"][pair] > 0])


def test_two_hosts_pack_the_one_host_layout(padded):
    # Each host packs its own shards and the hosts agree on the row counts (the max): the global arrays are the
    # ones a single host packs, whatever the host count.
    batch = padded[0]
    layout = packing.Layout(shards=4, chunks=2, rows_multiple=1)
    one = packing.pack_batch(batch, layout, first_shard=0, global_pairs=B)
    halves = [{k: v[h * B // 2:(h + 1) * B // 2] for k, v in batch.items()} for h in range(2)]
    need = [packing.pack_batch(x, layout, first_shard=2 * h, global_pairs=B) for h, x in enumerate(halves)]
    most = np.max([[n["query_ids"].shape[0] // 4, n["passage_ids"].shape[0] // 4] for n in need], axis=0)
    two = [packing.pack_batch(x, layout, first_shard=2 * h, global_pairs=B, agree=lambda rows: np.maximum(rows, most))
           for h, x in enumerate(halves)]
    for k in one:
        np.testing.assert_array_equal(np.concatenate([t[k] for t in two]), one[k])


def test_packed_equals_padded_one_device(minilm_path, mlqa_texts, padded):
    batch, (ref_q, ref_p), (ref_loss, ref_grads) = padded
    t, _ = _trainer(_config(minilm_path, packed=True), jax.devices()[:1])
    q, p = _embed(t, batch)
    np.testing.assert_allclose(q, ref_q, atol=2e-5)
    np.testing.assert_allclose(p, ref_p, atol=2e-5)
    loss, grads = _grads(t, batch)
    assert abs(loss - ref_loss) <= 1e-5 and ref_loss > 0.1
    assert max_abs_diff(grads, ref_grads) <= 5e-5
    assert float(np.abs(ref_grads["model"]["towers"]["encoder"]["layers"][0]["intermediate"]["kernel"]).max()) > 1e-3
    # The packed rows really are fewer: the point of packing.
    packed = t[0].global_batch(batch)
    assert packed["passage_ids"].shape[0] <= B * G // 2 and packed["query_ids"].shape[0] <= B // 2


def test_packed_with_grad_cache_on_a_mesh_equals_padded(minilm_path, padded):
    batch, _, (ref_loss, ref_grads) = padded
    # data 2 x fsdp 2 (4 devices: the mesh needs both axes, not 8 devices).
    t, _ = _trainer(_config(minilm_path, packed=True, mesh=(2, 2, 1), chunk=8), jax.devices()[:4])
    loss, grads = _grads(t, batch)
    assert abs(loss - ref_loss) <= 1e-5
    assert max_abs_diff(grads, ref_grads) <= 5e-5


@pytest.mark.parametrize("pooling", ["cls", "pooler"])
def test_packed_first_token_pooling_equals_padded(minilm_path, padded, pooling):
    batch = padded[0]
    ref, _ = _trainer(_config(minilm_path, packed=False, pooling=pooling), jax.devices()[:1])
    t, _ = _trainer(_config(minilm_path, packed=True, pooling=pooling), jax.devices()[:1])
    for a, b in zip(_embed(t, batch), _embed(ref, batch)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_xlmr_positions_restart_per_segment(random_xlmr_path, mlqa_texts):
    # RoBERTa offsets: each packed text counts its positions from pad_token_id + 1, as on its own padded row.
    kw = dict(lq=32, lp=96)
    ref, tok = _trainer(_config(random_xlmr_path, packed=False, **kw), jax.devices()[:1])
    t, _ = _trainer(_config(random_xlmr_path, packed=True, **kw), jax.devices()[:1])
    batch = _batch(tok, mlqa_texts)
    for a, b in zip(_embed(t, batch), _embed(ref, batch)):
        np.testing.assert_allclose(a, b, atol=2e-5)
