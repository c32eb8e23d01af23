"""The sharded train step: equal to the single-device computation, scores split by query rows, compiled once,
and the non-finite guard. A tiny real DualEncoder (2 layers, hidden 32) on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scale_helpers import tiny_batch, tiny_config, tiny_model

from mlret import parallel
from mlret.models import common
from mlret.step import build_train_step, decay_mask, learning_rate_schedule

# tiny_batch's defaults: B*G = 72 columns; no other array in the step has a 72-wide or 24-row score shape.
B, G = 24, 3

LOSS = dict(learnable_temperature=True, symmetric=True, within_view=True, vrn_weight=0.1)


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients on one device."""
    c = tiny_config((1, 1, 1), **LOSS)
    mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
    t, params = build_train_step(tiny_model(), c, mesh)
    (loss, metrics), grads = t.grad_fn()(params, t.global_batch(tiny_batch()))
    return float(loss), jax.device_get(grads)


def _max_abs_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("mesh_shape,gather", [((8, 1, 1), "constraint"), ((2, 4, 1), "constraint"),
                                               ((2, 2, 2), "constraint"), ((2, 2, 2), "shard_map")])
def test_sharded_loss_and_grads_equal_single_device(reference, mesh_shape, gather):
    ref_loss, ref_grads = reference
    c = tiny_config(mesh_shape, gather=gather, **LOSS)
    t, params = build_train_step(tiny_model(), c, parallel.make_mesh(c.mesh))
    (loss, _), grads = t.grad_fn()(params, t.global_batch(tiny_batch()))
    assert abs(float(loss) - ref_loss) <= 1e-5
    assert _max_abs_diff(grads, ref_grads) <= 1e-5
    # The gradients are not trivially small (the comparison means something).
    assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(ref_grads)) > 1e-2
    if mesh_shape == (2, 2, 2):  # weights really are split over fsdp and tensor
        spec = params["model"]["towers"]["encoder"]["layers"][0]["intermediate"]["kernel"].sharding.spec
        assert tuple(spec) == ("fsdp", "tensor")


@pytest.fixture(scope="module")
def step_8():
    """The train step on the (8, 1, 1) mesh, compiled once for the tests below, and a fresh state maker (each
    state owns its own copy of the loaded weights: the step donates it)."""
    c = tiny_config((8, 1, 1))
    t, params = build_train_step(tiny_model(), c, parallel.make_mesh(c.mesh))
    return t, t.global_batch(tiny_batch()), lambda: t.init_state(jax.tree.map(jnp.copy, params))


def test_score_matrix_is_sharded_by_query_rows(step_8):
    t, batch, fresh = step_8
    hlo = t.step.lower(fresh(), batch).compile().as_text()
    rows = B // 8
    # Per device: a [B/8, B*G] block of the scores; the full [B, B*G] matrix never exists on one device.
    assert f"f32[{rows},{B * G}]" in hlo
    assert f"f32[{B},{B * G}]" not in hlo and f"f32[{B * G},{B}]" not in hlo


def test_step_compiles_once_and_learns(step_8):
    t, batch, fresh = step_8
    state = fresh()
    losses = []
    for _ in range(6):
        state, metrics = t.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert t.trace_count == 1 and t.step._cache_size() == 1
    assert int(state["step"]) == 6 and bool(metrics["finite"])
    assert losses[-1] < losses[0]  # the same batch six times: AdamW must lower its loss


def test_nonfinite_update_is_skipped_and_counted(step_8):
    t, batch, fresh = step_8
    state = fresh()
    kernel = state["params"]["model"]["towers"]["encoder"]["layers"][0]["intermediate"]["kernel"]
    state["params"]["model"]["towers"]["encoder"]["layers"][0]["intermediate"]["kernel"] = kernel.at[0, 0].set(
        jnp.nan)
    before = jax.device_get(state["params"])
    for expected_in_row in (1, 2):
        state, metrics = t.step(state, batch)
        assert not bool(metrics["finite"]) and int(metrics["nonfinite_in_row"]) == expected_in_row
    after = jax.device_get(state["params"])
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)  # NaN == NaN for assert_array_equal
    assert int(state["nonfinite_total"]) == 2 and int(state["step"]) == 2


def test_weight_decay_mask_and_schedule():
    model = tiny_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = decay_mask(params)
    enc = mask["towers"]["encoder"]
    assert enc["layers"][0]["intermediate"]["kernel"] and enc["embeddings"]["word"]["embedding"]
    assert not enc["layers"][0]["intermediate"]["bias"]
    assert not enc["layers"][0]["output_norm"]["scale"] and not enc["embeddings"]["norm"]["bias"]
    c = tiny_config()
    sched = learning_rate_schedule(c.optim, c.train.steps)
    peak, warm = c.optim.learning_rate, c.optim.warmup_steps
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(warm)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(sched(c.train.steps)), peak * c.optim.end_learning_rate_factor, atol=1e-12)
    assert float(sched(warm // 2)) < peak and float(sched(warm + 1)) < peak


def test_trainer_refuses_a_large_weight_the_rules_cannot_shard():
    """vocab 95 does not divide over tensor=2 and fsdp=1 leaves embed whole: the word table ends up replicated."""
    model = tiny_model()
    word = model.towers.encoder.embeddings.word
    word.embedding.set_value(word.embedding.get_value()[:95])
    c = tiny_config((4, 1, 2))
    with pytest.raises(parallel.ShardingError, match=r"'word'\]\['embedding'\] \(95, 32\) logical \('vocab', "
                                                      r"'embed'\): rules shard vocab->tensor"):
        build_train_step(model, c, parallel.make_mesh(c.mesh))
    c.mesh.replicated_param_threshold = 95 * 32  # at the threshold it may stay replicated
    build_train_step(model, c, parallel.make_mesh(c.mesh))


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_deferred_vocabulary_gradient_equals_the_plain_gradient(mesh_shape):
    """The train step scatters the word table's gradient after every other gradient
    (`common.value_and_grad_deferring_lookups`): loss and every gradient equal `jax.value_and_grad`'s, on one device
    and with the table split over fsdp and tensor. A vocabulary larger than the batch's tokens, so the table is
    deferred, and repeated ids (padding, collisions), so rows are summed."""
    vocab = 4096
    c = tiny_config(mesh_shape, **LOSS)
    t, params = build_train_step(tiny_model(vocab=vocab), c, parallel.make_mesh(c.mesh, jax.devices()[:8]))
    batch = t.global_batch(tiny_batch(vocab=vocab))
    deferred = common.deferred_lookups(t.loss_fn, params, batch)
    assert [s.shape for s in deferred] == [(B, 8, 32), (B * G, 8, 32)]  # the word table, once per tower
    plain = jax.jit(lambda p, b: jax.value_and_grad(t.loss_fn, has_aux=True)(p, b))
    (loss, _), grads = jax.jit(lambda p, b: common.value_and_grad_deferring_lookups(t.loss_fn, p, b))(params, batch)
    (ref_loss, _), ref_grads = plain(params, batch)
    assert float(loss) == float(ref_loss)
    assert _max_abs_diff(grads, ref_grads) <= 1e-6
    table = np.asarray(grads["model"]["towers"]["encoder"]["embeddings"]["word"]["embedding"])
    ids = np.unique(np.concatenate([np.asarray(batch["query_ids"]).ravel(), np.asarray(batch["passage_ids"]).ravel()]))
    assert np.abs(table[ids]).min(axis=1).max() > 0  # looked-up rows have gradients ...
    assert not np.delete(table, ids, axis=0).any()  # ... and the others none


def test_step_applies_the_optimizers_chain():
    """Two steps of the train step (clipping before its non-finite guard, AdamW under it) equal optax's own
    chain, clip_by_global_norm then AdamW (`trainer.tx`), applied to the same gradients; with a clip norm the
    gradients exceed, so clipping acts."""
    c = tiny_config((1, 1, 1))
    c.optim.clip_norm = 0.05
    t, params = build_train_step(tiny_model(), c, parallel.make_mesh(c.mesh, jax.devices()[:1]))
    batch = t.global_batch(tiny_batch())
    ref_params = jax.device_get(params)
    ref_opt = t.tx.init(ref_params)
    state = t.init_state(jax.tree.map(jnp.copy, params))
    for _ in range(2):
        (_, _), grads = t.grad_fn()(ref_params, batch)
        assert float(optax.tree.norm(grads)) > 2 * c.optim.clip_norm
        updates, ref_opt = jax.jit(t.tx.update)(grads, ref_opt, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        state, _ = t.step(state, batch)
    assert _max_abs_diff(state["params"], ref_params) <= 1e-6
    assert _max_abs_diff(state["opt_state"], ref_opt) <= 1e-6
