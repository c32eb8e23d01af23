"""FSDP and tensor sharding on 8 simulated devices: training steps on (1,8,1), (2,2,2) and (1,4,2) meshes follow the
data-parallel (8,1,1) run, and each device holds the share of the parameters (and AdamW moments) that the rules
give it, measured from the arrays' addressable shards. A tiny model with the XLM-R-base *shape* of rules (every
matrix has an embed axis -> fsdp and a vocab/heads/mlp axis -> tensor); benchmarks/sharding_memory.py does the same
at XLM-R-base size."""

import math

import jax
import numpy as np
import pytest
from scale_helpers import max_abs_diff, tiny_batch, tiny_config, tiny_model

from mlret import parallel
from mlret.step import build_train_step

HIDDEN, VOCAB, STEPS = 64, 128, 3
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]


def _trainer(mesh_shape):
    c = tiny_config(mesh_shape, steps=STEPS)
    c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 0  # updates big enough to tell runs apart
    return build_train_step(tiny_model(hidden=HIDDEN, vocab=VOCAB, scale=5.0), c, parallel.make_mesh(c.mesh))


def _run(t, params):
    state = t.init_state(params)
    losses = []
    for s in range(STEPS):
        state, metrics = t.step(state, t.global_batch(tiny_batch(s, batch=16, group=2, vocab=VOCAB)))
        losses.append(float(metrics["loss"]))
    return state, losses


def _bytes_per_device(tree) -> dict:
    """Bytes of `tree`'s arrays that live on each device, from their addressable shards."""
    per = {}
    for arr in jax.tree.leaves(tree):
        for shard in arr.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return per


def _expected_bytes(t, params) -> int:
    """Per-device parameter bytes from the model's logical axes and the config's rules, by hand: an axis named
    `embed` is split over fsdp, `vocab`/`heads`/`mlp` over tensor (each mesh axis at most once per array)."""
    fsdp, tensor = t.mesh.shape["fsdp"], t.mesh.shape["tensor"]
    total = 0
    flat_p = jax.tree.leaves(params["model"])
    flat_l = jax.tree.leaves(t.param_logical, is_leaf=lambda x: x is None or isinstance(x, tuple))
    for arr, names in zip(flat_p, flat_l, strict=True):
        names = names or ()
        split = (fsdp if "embed" in names else 1) * (tensor if {"vocab", "heads", "mlp"} & set(names) else 1)
        total += arr.nbytes // split
    return total


@pytest.fixture(scope="module")
def runs():
    out = {}
    for mesh_shape in MESHES:
        t, params = _trainer(mesh_shape)
        state, losses = _run(t, params)
        out[mesh_shape] = (t, jax.device_get(state["params"]), losses, _bytes_per_device(state["params"]),
                           _bytes_per_device(state["opt_state"]))
    return out


@pytest.mark.parametrize("mesh_shape", MESHES[1:])
def test_sharded_training_follows_data_parallel(runs, mesh_shape):
    _, ref_params, ref_losses, _, _ = runs[(8, 1, 1)]
    _, params, losses, _, _ = runs[mesh_shape]
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    assert len(set(ref_losses)) == STEPS  # three different batches, three different losses
    # After 3 AdamW steps of lr 1e-3 (each moves a weight by up to ~1e-3), the runs agree to float32 noise.
    assert max_abs_diff(params, ref_params) <= 1e-5


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_parameter_bytes_per_device_fall_with_fsdp_and_tensor(runs, mesh_shape):
    t, params, _, param_bytes, opt_bytes = runs[mesh_shape]
    assert len(param_bytes) == 8
    expected = _expected_bytes(t, params)
    assert set(param_bytes.values()) == {expected}  # every device holds exactly its share
    total = sum(a.nbytes for a in jax.tree.leaves(params))
    split = t.mesh.shape["fsdp"] * t.mesh.shape["tensor"]
    # Only vectors escape the full split (LayerNorm and output biases are replicated, the other biases split over
    # tensor alone): at most a quarter more than an even split, for this narrow model.
    assert total / split <= expected <= total / split * 1.25 if split > 1 else expected == total
    # AdamW's two moments are laid out like the parameters (+ a replicated step count per transform).
    assert all(abs(b - 2 * expected) <= 64 for b in opt_bytes.values())
    if mesh_shape[1] == 8:
        dp_bytes = runs[(8, 1, 1)][3]
        assert expected <= next(iter(dp_bytes.values())) / 7  # fsdp=8: about 1/8 of a data-parallel replica
    assert math.prod(mesh_shape) == 8
