"""bfloat16 compute with float32 parameters, AdamW moments and loss: the train step really computes in bf16 (its
compiled matmuls are bf16), keeps everything it stores in float32, and a short run's loss curve stays within 2% of
float32's (docs/robustness.md records the full smoke run). Tiny model on 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scale_helpers import tiny_batch, tiny_config, tiny_model

from mlret import parallel
from mlret.step import build_train_step

STEPS = 8
# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation); through 2 layers, pooling and a
# temperature of 0.05 that grows to about a percent of the loss. 2% is the stated tolerance of the smoke comparison.
REL_TOL = 0.02


def _run(dtype):
    c = tiny_config((2, 2, 2), steps=STEPS)
    c.model.compute_dtype = dtype
    c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 0
    t, params = build_train_step(tiny_model(hidden=64, dtype=dtype, scale=3.0), c, parallel.make_mesh(c.mesh))
    state = t.init_state(params)
    batches = [t.global_batch(tiny_batch(s, batch=16, group=2, length=16)) for s in range(STEPS)]
    hlo = t.step.lower(state, batches[0]).compile().as_text()
    losses, metrics = [], None
    for b in batches:
        state, metrics = t.step(state, b)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, metrics, hlo


@pytest.fixture(scope="module")
def runs():
    return {d: _run(d) for d in ("float32", "bfloat16")}


def test_bf16_computes_in_bf16_and_stores_float32(runs):
    _, state, metrics, hlo = runs["bfloat16"]
    # The matmuls of the encoder run on bf16 operands (float32 runs have none).
    assert "bf16[" in hlo and "dot(" in hlo
    assert "bf16[" not in runs["float32"][3]
    for name, tree in (("params", state["params"]), ("opt_state", state["opt_state"])):
        dtypes = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}, (name, dtypes)
    assert metrics["loss"].dtype == jnp.float32 and metrics["grad_norm"].dtype == jnp.float32


def test_bf16_loss_curve_tracks_float32(runs):
    f32, bf16 = runs["float32"][0], runs["bfloat16"][0]
    rel = np.abs(bf16 - f32) / np.abs(f32)
    assert rel.max() <= REL_TOL, (f32, bf16)
    assert rel.max() > 0  # it really is a different computation
    assert f32[-1] < f32[0] and bf16[-1] < bf16[0]  # both learn
