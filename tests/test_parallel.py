"""Mesh construction from the config, the logical-axis rules, and the replicated-weight check."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlret import parallel
from mlret.config import default_config


def mesh_cfg(data=-1, fsdp=1, tensor=1, dcn_data=1):
    c = default_config().mesh
    c.data, c.fsdp, c.tensor, c.dcn_data = data, fsdp, tensor, dcn_data
    return c


def test_mesh_shapes_and_errors():
    assert parallel.make_mesh(mesh_cfg(-1, 2, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.make_mesh(mesh_cfg(-1)).shape == {"data": 8, "fsdp": 1, "tensor": 1}
    assert parallel.make_mesh(mesh_cfg(2, 1, 1)).size == 2  # smaller than the device list: its first devices
    with pytest.raises(parallel.ShardingError, match=r"config.mesh: .* 16 devices, but only 8"):
        parallel.make_mesh(mesh_cfg(4, 2, 2))
    with pytest.raises(parallel.ShardingError, match="config.mesh: 8 devices do not divide"):
        parallel.make_mesh(mesh_cfg(-1, 3))
    with pytest.raises(parallel.ShardingError, match="config.mesh.tensor"):
        parallel.make_mesh(mesh_cfg(-1, 1, 0))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """Enough of a device for mesh_utils' hybrid layout: two slices of four."""
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_hybrid_mesh_puts_slices_on_the_data_axis():
    devices = [FakeDevice(i, slice_index=i // 4) for i in [3, 6, 0, 5, 2, 7, 1, 4]]  # shuffled on purpose
    arr = parallel.device_array(mesh_cfg(-1, 1, 2, dcn_data=2), devices)
    assert arr.shape == (4, 1, 2)
    slices = np.vectorize(lambda d: d.slice_index)(arr)
    # The first half of the data axis is one slice, the second half the other; fsdp x tensor stay in a slice.
    assert (slices[:2] == slices[0, 0, 0]).all() and (slices[2:] == slices[2, 0, 0]).all()
    assert slices[0, 0, 0] != slices[2, 0, 0]
    with pytest.raises(parallel.ShardingError, match="config.mesh.dcn_data"):
        parallel.device_array(mesh_cfg(-1, 1, 1, dcn_data=3), devices + devices[:1])


def test_rules_to_partition_specs():
    rules = parallel.parse_rules(default_config().mesh.rules)
    mesh = parallel.make_mesh(mesh_cfg(2, 2, 2))
    assert parallel.logical_to_spec(("vocab", "embed"), rules, mesh, (96, 32)) == P("tensor", "fsdp")
    assert parallel.logical_to_spec(("norm",), rules, mesh, (32,)) == P(None)
    # A mesh axis is used once per array: embed x embed shards only the first.
    assert parallel.logical_to_spec(("embed", "embed"), rules, mesh, (32, 32)) == P("fsdp", None)
    # A dimension the axis does not divide stays whole.
    assert parallel.logical_to_spec(("vocab", "embed"), rules, mesh, (95, 32)) == P(None, "fsdp")
    assert parallel.batch_axes(rules, mesh) == ("data", "fsdp")
    assert parallel.data_parallel_size(rules, mesh) == 4
    with pytest.raises(parallel.ShardingError, match="logical axis 'experts' has no rule"):
        parallel.logical_to_spec(("experts",), rules, mesh, (4,))
    with pytest.raises(parallel.ShardingError, match=r"config.mesh.rules\[1\]: 'model' is not a mesh axis"):
        parallel.parse_rules((("batch", "data"), ("vocab", "model")))
    with pytest.raises(parallel.ShardingError, match="appears twice"):
        parallel.parse_rules((("batch", "data"), ("batch", None)))


def test_replicated_weight_check():
    rules = parallel.parse_rules(default_config().mesh.rules)
    mesh = parallel.make_mesh(mesh_cfg(2, 2, 2))
    logical = {"word": ("vocab", "embed"), "scale": ("norm",)}
    host = {"word": np.ones((64, 32), np.float32), "scale": np.ones((32,), np.float32)}
    specs = {k: NamedSharding(mesh, parallel.logical_to_spec(v, rules, mesh, host[k].shape))
             for k, v in logical.items()}
    placed = jax.device_put(host, specs)
    parallel.check_param_sharding(placed, logical, mesh, rules, threshold=1000)  # sharded as the rules say
    replicated = jax.device_put(host, NamedSharding(mesh, P()))
    with pytest.raises(parallel.ShardingError, match=r"\['word'\] \(64, 32\) logical \('vocab', 'embed'\)"):
        parallel.check_param_sharding(replicated, logical, mesh, rules, threshold=1000)
    # Below the threshold a replicated weight is fine; so is one whose rules shard nothing on this mesh.
    parallel.check_param_sharding(replicated, logical, mesh, rules, threshold=4096)
    parallel.check_param_sharding(jax.device_put(host, NamedSharding(mesh, P())), {"word": ("norm", "pos"),
                                  "scale": ("norm",)}, mesh, rules, threshold=1000)


def test_global_batch_from_host_slice():
    rules = parallel.parse_rules(default_config().mesh.rules)
    mesh = parallel.make_mesh(mesh_cfg(2, 2, 2))
    local = {"unit_id": np.arange(8, dtype=np.int32), "passage_ids": np.zeros((8, 3, 5), np.int32)}
    batch = parallel.make_global_batch(local, mesh, rules)
    assert batch["passage_ids"].shape == (8, 3, 5)  # one process: the slice is the whole batch
    assert batch["unit_id"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["unit_id"]), local["unit_id"])


def test_enable_compilation_cache_follows_the_config_field_and_the_environment(tmp_path):
    """In a subprocess (jax reads the cache setting once per process): "" leaves the cache off, a path with ~ is
    expanded, created and handed to jax, and JAX_COMPILATION_CACHE_DIR overrides the field."""
    import os
    import subprocess
    import sys

    script = ("import sys, jax\n"
              "from mlret import parallel\n"
              "print(parallel.enable_compilation_cache(sys.argv[1]), jax.config.jax_compilation_cache_dir)\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(HOME=str(tmp_path), JAX_PLATFORMS="cpu")

    def run(field, **extra):
        p = subprocess.run([sys.executable, "-c", script, field], capture_output=True, text=True,
                           env={**env, **extra}, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.split()

    assert run("") == ["None", "None"]
    want = str(tmp_path / "cache" / "jax")
    assert run("~/cache/jax") == [want, want] and os.path.isdir(want)
    assert run("~/cache/jax", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "env")) == [str(tmp_path / "env")] * 2
