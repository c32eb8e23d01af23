"""The run's CheckpointManager: items, save policy, keep-N and best-N, the iterator state, and skipping a damaged
latest step. Small in-process states (no model); the model-level resume is tests/test_train.py."""

import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlret.checkpoint import Checkpointer, config_from_dict
from mlret.config import default_config


def small_config(**checkpoint):
    c = default_config()
    c.checkpoint.async_save = True
    c.checkpoint.update(checkpoint)
    return c


def state_at(step: int) -> dict:
    """A state whose values depend on the step (so a restore of the wrong step shows)."""
    return {"params": {"w": jnp.full((4, 3), float(step)), "layers": {0: {"b": jnp.arange(3.0) + step}}},
            "step": jnp.int32(step), "rng": jax.random.key_data(jax.random.key(step))}


def abstract(state: dict) -> dict:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def data_iter():
    return iter(grain.MapDataset.range(1000).shuffle(seed=3).map(lambda i: i * 2).to_iter_dataset())


def run(ck: Checkpointer, config, steps, metrics=None):
    """Step an iterator and save at each step as the policy says; returns the elements seen."""
    it, seen = data_iter(), []
    for s in steps:
        seen.append(next(it))
        ck.save(s, state_at(s), it, config, metrics=(metrics or {}).get(s), force=s in (metrics or {}))
    ck.wait()
    return seen


def test_policy_items_and_resume_of_state_and_iterator(tmp_path):
    config = small_config(every=3, keep=2)
    ck = Checkpointer(tmp_path, config)
    seen = run(ck, config, range(1, 11))
    assert ck.steps() == [6, 9]  # saved at 3, 6, 9; keep the latest two
    step_dir = tmp_path / "checkpoints" / "9"
    assert {"state", "data", "config"} <= set(os.listdir(step_dir))
    assert ck.restore_config(9).to_dict() == config.to_dict()
    it = data_iter()
    step, state, it = ck.restore(abstract(state_at(0)), it)
    assert step == 9
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((4, 3), 9.0))
    np.testing.assert_array_equal(np.asarray(state["rng"]), np.asarray(jax.random.key_data(jax.random.key(9))))
    assert next(it) == seen[9]  # the restored iterator continues where step 9 left it
    ck.close()


def test_damaged_latest_step_is_skipped_with_a_warning(tmp_path, caplog):
    config = small_config(every=1, keep=5, async_save=False)
    ck = Checkpointer(tmp_path, config)
    seen = run(ck, config, [1, 2])
    ck.close()
    # Truncate the array data of step 2 (what a disk-full or a copy cut short leaves behind).
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "checkpoints" / "2" / "state") for f in fs
                  if os.sep + "d" + os.sep in os.path.join(d, f)]
    assert data_files
    for f in data_files:
        with open(f, "r+b") as fh:
            fh.truncate(max(os.path.getsize(f) // 3, 1))
    # And a half-written step (orbax's temporary directory) must not count as a step at all.
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234").mkdir()
    ck = Checkpointer(tmp_path, config)
    assert ck.steps() == [1, 2]
    with caplog.at_level(logging.WARNING, logger="mlret.checkpoint"):
        step, state, it = ck.restore(abstract(state_at(0)), data_iter())
    assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0 and next(it) == seen[1]
    # The manifest written at the save names the file that differs; the step is set aside, not deleted.
    assert f"step 2 in {tmp_path}/checkpoints is damaged: state/" in caplog.text, caplog.text
    assert "when written (truncated or rewritten)" in caplog.text
    assert ck.steps() == [1] and list((tmp_path / "checkpoints_damaged").iterdir())
    ck.close()


def test_best_checkpoint_is_kept_by_metric(tmp_path):
    config = small_config(every=1, keep=1, best_metric="xquad_r/mrr", best_mode="max", keep_best=1)
    ck = Checkpointer(tmp_path, config)
    mrr = {2: {"xquad_r/mrr": 0.3}, 4: {"xquad_r/mrr": 0.7}, 6: {"xquad_r/mrr": 0.5}}
    run(ck, config, range(1, 9), metrics=mrr)
    # The latest (8) by keep=1, and step 4, the best MRR, although later steps exist.
    assert ck.steps() == [4, 8]
    assert ck.manager.best_step() == 4
    ck.close()


def test_config_round_trip_through_json():
    c = default_config()
    c.data.global_batch = 48
    c.mesh.rules = (("batch", ("data",)), ("vocab", None), ("embed", "fsdp"), ("heads", "tensor"), ("kv", None),
                    ("mlp", "tensor"), ("pos", None), ("type", None), ("norm", None))
    back = config_from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.data.global_batch == 48 and back.mesh.rules == c.mesh.rules
    assert isinstance(back.mesh.rules, tuple)


def test_restore_without_checkpoints_returns_none(tmp_path):
    ck = Checkpointer(tmp_path, small_config())
    assert ck.restore(abstract(state_at(0)), data_iter()) is None
    ck.close()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint step"):
        from mlret.checkpoint import restore_for_export

        restore_for_export(tmp_path)
