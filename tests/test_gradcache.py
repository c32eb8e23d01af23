"""Gradient caching (mlret/gradcache.py) gives the plain step's loss and gradients, on one device and on
sharded meshes, for several chunk sizes; the cached step trains and compiles once; bad chunk sizes are refused."""

import jax
import numpy as np
import pytest
from scale_helpers import max_abs_diff, tiny_batch, tiny_config, tiny_model

from mlret import parallel
from mlret.config import validate
from mlret.errors import GradCacheError
from mlret.gradcache import from_chunks, to_chunks
from mlret.step import build_train_step

# Every loss term that has parameters or couples pairs: learnable τ, both directions, the variance penalty.
LOSS = dict(learnable_temperature=True, symmetric=True, within_view=True, vrn_weight=0.1)


@pytest.fixture(scope="module")
def plain():
    """Loss and gradients of the plain (uncached) step on one device."""
    c = tiny_config((1, 1, 1), **LOSS)
    t, params = build_train_step(tiny_model(tied=False), c, parallel.make_mesh(c.mesh, jax.devices()[:1]))
    (loss, metrics), grads = t.grad_fn()(params, t.global_batch(tiny_batch()))
    return float(loss), jax.device_get(metrics), jax.device_get(grads)


def test_chunk_layout_round_trip():
    x = np.arange(24 * 2).reshape(24, 2)
    chunks = np.asarray(to_chunks(x, 3, 4))  # 4 devices of 6 rows, 3 chunks of 2 rows per device
    assert chunks.shape == (3, 8, 2)
    # Chunk 0 holds rows 0-1 of every device's block of 6: each device encodes only its own rows.
    np.testing.assert_array_equal(chunks[0, :, 0] // 2, [0, 1, 6, 7, 12, 13, 18, 19])
    np.testing.assert_array_equal(np.asarray(from_chunks(chunks, 4)), x)


@pytest.mark.parametrize("mesh_shape,chunk", [((1, 1, 1), 4), ((8, 1, 1), 8), ((2, 2, 2), 12)])
def test_cached_loss_and_grads_equal_plain(plain, mesh_shape, chunk):
    ref_loss, ref_metrics, ref_grads = plain
    c = tiny_config(mesh_shape, **LOSS)
    c.train.grad_cache_chunk = chunk
    devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else None
    t, params = build_train_step(tiny_model(tied=False), c, parallel.make_mesh(c.mesh, devices))
    (loss, metrics), grads = t.grad_fn()(params, t.global_batch(tiny_batch()))
    assert abs(float(loss) - ref_loss) <= 1e-5
    assert abs(float(metrics["accuracy"]) - float(ref_metrics["accuracy"])) <= 1e-6
    assert max_abs_diff(grads, ref_grads) <= 1e-5
    # Both towers and τ get gradients, and they are not trivially small (so the comparison means something).
    model = ref_grads["model"]["towers"]
    for tower in ("query", "passage"):
        assert float(np.abs(model[tower]["layers"][0]["intermediate"]["kernel"]).max()) > 1e-2
    assert abs(float(ref_grads["log_temperature"])) > 1e-3


def test_cached_step_trains_and_compiles_once():
    c = tiny_config((8, 1, 1))
    c.train.grad_cache_chunk = 8
    t, params = build_train_step(tiny_model(), c, parallel.make_mesh(c.mesh))
    batch = t.global_batch(tiny_batch())
    state = t.init_state(params)
    losses = []
    for _ in range(4):
        state, metrics = t.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert t.trace_count == 1 and t.step._cache_size() == 1
    assert bool(metrics["finite"]) and losses[-1] < losses[0]


@pytest.mark.parametrize("chunk,message", [(6, "multiple of the data-parallel size 8"),
                                           (16, "does not divide config.data.global_batch=24")])
def test_bad_chunk_is_refused_naming_the_field(chunk, message):
    c = tiny_config((8, 1, 1))
    c.train.grad_cache_chunk = chunk
    c.data.global_batch = len(tiny_batch()["unit_id"])  # the batch the step would get: 24 pairs
    with pytest.raises(GradCacheError, match=f"config.train.grad_cache_chunk={chunk}.*{message}"):
        validate(c, devices=8, processes=1)
