"""Device mesh, logical-axis sharding rules, multi-host start-up and global batch assembly.

All parallelism in mlret is `jax.jit` over a named mesh with axes `(data, fsdp, tensor)` (the MaxText
plumbing; docs/architecture.md): the batch is split over `data` x `fsdp`, weights over `fsdp` and `tensor`
according to logical-axis rules from the config (`config.mesh.rules`), which map the names the model puts on its
parameters (`vocab`, `embed`, `heads`, `kv`, `mlp`, `pos`, `type`, `norm`) and the data's `batch` to mesh axes.
`check_param_sharding` fails loudly when a large weight ends up replicated although the rules shard it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlret import storage
from mlret.errors import ShardingError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, tuple[str, ...]], ...]


# --------------------------------------------------------------------------------------------------------------
# Multi-host start-up.


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, peer_timeout_s: int = 60) -> None:
    """Start `jax.distributed` before anything touches a device.

    With all three arguments, they are used as given. With none, `jax.distributed.initialize()` detects TPU VMs,
    Slurm and Open MPI itself; where it finds no cluster (a laptop, one GPU box) the run stays single-process.
    `peer_timeout_s` (config.runtime.peer_timeout_s) is jax's heartbeat timeout, after which a silent process
    counts as dead and the others are ended (mlret/supervise.py turns that into one line and status 76), and its
    shutdown timeout, the longest wait for the others at the end of the run.
    """
    timeouts = {"heartbeat_timeout_seconds": int(peer_timeout_s), "shutdown_timeout_seconds": int(peer_timeout_s)}
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ShardingError("--coordinator_address, --num_processes and --process_id go together: give all three, "
                            "or none to auto-detect a TPU VM / Slurm / Open MPI cluster")
    if coordinator_address is not None:
        jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id), **timeouts)
        return
    try:
        jax.distributed.initialize(**timeouts)
    except ValueError as e:
        # No cluster environment found: jax asks for a coordinator address. One process is the right answer.
        log.info("jax.distributed: no cluster detected (%s); running as a single process", e)


# --------------------------------------------------------------------------------------------------------------
# Mesh.


def enable_compilation_cache(path: str) -> str | None:
    """Turn on jax's persistent compilation cache in `path` (a restarted run then loads its train step and
    encoders instead of compiling them again). JAX_COMPILATION_CACHE_DIR, when set, wins; "" leaves it off.
    Call before the first compilation: jax reads the setting once per process. Returns the directory used."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]  # jax read it at import
    if not path:
        return None
    where = storage.path(path, "config.train.compilation_cache_dir")  # jax reads and writes gs:// through epath
    where.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(where))
    return str(where)


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes of the mesh from `config.mesh`.

    `config.mesh.data` is the data-parallel size inside one slice (-1: what fsdp x tensor leave); the mesh's data
    axis is `dcn_data` times that.
    """
    fsdp, tensor, dcn = int(mesh_config.fsdp), int(mesh_config.tensor), int(mesh_config.dcn_data)
    for name, v in (("fsdp", fsdp), ("tensor", tensor), ("dcn_data", dcn)):
        if v < 1:
            raise ShardingError(f"config.mesh.{name}: {v} must be >= 1")
    data = int(mesh_config.data)
    if data == -1:
        rest = fsdp * tensor * dcn
        if num_devices % rest:
            raise ShardingError(f"config.mesh: {num_devices} devices do not divide into fsdp={fsdp} x tensor={tensor}"
                                f" x dcn_data={dcn}; change config.mesh.fsdp / tensor / dcn_data")
        data = num_devices // rest * dcn
    elif data < 1:
        raise ShardingError(f"config.mesh.data: {data} must be >= 1 or -1 (fill the remaining devices)")
    else:
        data *= dcn
    n = data * fsdp * tensor
    if n > num_devices:
        raise ShardingError(f"config.mesh: data={data} x fsdp={fsdp} x tensor={tensor} = {n} devices, but only "
                            f"{num_devices} are available; shrink config.mesh.data/fsdp/tensor (or set data=-1)")
    return data, fsdp, tensor


def validate_mesh(config: Any, num_devices: int, process_count: int) -> int:
    """Check `config.mesh` against `num_devices` devices and the global batch against the data-parallel size and
    the processes (`mlret.config.validate` with `devices=` calls it); returns the data-parallel size."""
    rules = parse_rules(config.mesh.rules)
    data, fsdp, tensor = mesh_shape(config.mesh, num_devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    batch = dict(rules).get("batch")
    if batch is None:
        raise ShardingError("config.mesh.rules: no rule for the logical axis 'batch'")
    dp = math.prod(sizes[a] for a in batch)
    gb = int(config.data.global_batch)
    if gb % dp:
        raise ShardingError(f"config.data.global_batch: {gb} is not divisible by the data-parallel size {dp} (mesh "
                            f"axes {' x '.join(batch)} = {' x '.join(str(sizes[a]) for a in batch)}); use a "
                            f"multiple of {dp}")
    if gb % process_count:
        raise ShardingError(f"config.data.global_batch: {gb} is not divisible by the {process_count} processes")
    return dp


def device_array(mesh_config: Any, devices: Sequence[Any] | None = None) -> np.ndarray:
    """The devices laid out as the (data, fsdp, tensor) array `make_mesh` wraps.

    `dcn_data > 1` lays out a hybrid mesh: the data axis spans slices (TPU; processes where devices have no
    `slice_index`, e.g. GPU nodes) over the slow network, while fsdp and tensor stay inside a slice. A mesh
    smaller than the device list uses its first devices (single process only: every process must hold part of
    a multi-host mesh).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    n = math.prod(shape)
    if n < len(devices):
        if jax.process_count() > 1:
            raise ShardingError(f"config.mesh: the mesh has {n} devices but the {jax.process_count()} processes hold "
                                f"{len(devices)}; a multi-host mesh must use all of them (set config.mesh.data=-1)")
        log.warning("config.mesh uses %d of %d devices", n, len(devices))
        devices = devices[:n]
    dcn = int(mesh_config.dcn_data)
    if dcn > 1:
        if shape[0] % dcn:
            raise ShardingError(f"config.mesh.dcn_data: {dcn} does not divide the data axis {shape[0]}")
        granule_is_process = getattr(devices[0], "slice_index", None) is None
        try:
            return mesh_utils.create_hybrid_device_mesh(
                (shape[0] // dcn, shape[1], shape[2]), (dcn, 1, 1), devices, process_is_granule=granule_is_process)
        except ValueError as e:
            unit = "processes" if granule_is_process else "slices"
            raise ShardingError(f"config.mesh.dcn_data={dcn}: cannot lay the data axis over {unit} ({e}); set it "
                                f"to the number of {unit}") from e
    return _make_mesh(shape, devices).devices


def _make_mesh(shape: Sequence[int], devices: Sequence[Any]) -> Mesh:
    # Auto axis types: GSPMD-style jit with sharding constraints (jax.make_mesh now defaults to Explicit).
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def make_mesh(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh from `config.mesh` (see `device_array` for the layout)."""
    arr = device_array(mesh_config, devices)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# --------------------------------------------------------------------------------------------------------------
# Logical-axis rules.


def parse_rules(rules: Any) -> Rules:
    """Normalise `config.mesh.rules` (pairs of logical name -> mesh axis | tuple of axes | None; lists from JSON
    are accepted) and check that every mesh axis named exists."""
    out = []
    seen = set()
    for i, pair in enumerate(rules):
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ShardingError(f"config.mesh.rules[{i}]: {pair!r} is not a (logical_name, mesh_axes) pair")
        name, axes = pair
        if name in seen:
            raise ShardingError(f"config.mesh.rules[{i}]: logical axis {name!r} appears twice")
        seen.add(name)
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        axes = tuple(axes)
        for a in axes:
            if a not in MESH_AXES:
                raise ShardingError(f"config.mesh.rules[{i}]: {a!r} is not a mesh axis (one of {MESH_AXES})")
        out.append((name, axes))
    return tuple(out)


def logical_to_spec(logical: Sequence[str | None] | None, rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None, *, what: str = "array") -> P:
    """The PartitionSpec the rules give to an array whose axes carry the `logical` names.

    A mesh axis is used at most once per array (the first dimension that asks for it wins) and only where it
    divides the dimension; a rule that cannot apply is dropped with a warning (so `check_param_sharding` can
    report a large weight that ends up replicated).
    """
    if not logical:
        return P()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ShardingError(f"{what}: logical axis {name!r} has no rule in config.mesh.rules; add "
                                f"({name!r}, <mesh axis or None>)")
        axes = tuple(a for a in table[name] if a not in used and mesh.shape[a] > 1)
        if shape is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[dim] % size:
                log.warning("%s: dimension %d (%s, size %d) is not divisible by mesh axes %s (%d); not sharded",
                            what, dim, name, shape[dim], axes, size)
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While a step is traced (inside `jax.jit`): the logical-axis rules and the mesh by which the models pin their
    activations (`mlret.models.common.constrain`: the hidden states' batch axis over the `batch` rule's axes, the
    hidden axis whole), so that with mesh.fsdp > 1 XLA gathers weights, not activations."""
    with nnx.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def batch_axes(rules: Rules, mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over (the `batch` rule)."""
    table = dict(rules)
    if "batch" not in table:
        raise ShardingError("config.mesh.rules: no rule for the logical axis 'batch'")
    return tuple(table["batch"])


def batch_spec(rules: Rules, mesh: Mesh) -> P:
    return P(batch_axes(rules, mesh))


def data_parallel_size(rules: Rules, mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(rules, mesh))


def variable_logical_axes(variable: Any) -> tuple[str | None, ...] | None:
    """The logical axis names an `nnx.Variable` carries (its `out_sharding` metadata), or None."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(names) if names else None


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for an `nnx.State` (leaves: Variables) from their logical names; unannotated leaves are
    replicated. The result has the state's structure with plain NamedSharding leaves."""
    def one(path, v):
        if isinstance(v, nnx.Variable):
            logical = variable_logical_axes(v)
            shape = np.shape(v.get_value())
        else:
            logical, shape = None, np.shape(v)
        name = jax.tree_util.keystr(path)
        return NamedSharding(mesh, logical_to_spec(logical, rules, mesh, shape, what=f"param {name}"))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_param_sharding(arrays: Any, logical: Any, mesh: Mesh, rules: Rules, threshold: int) -> None:
    """Raise when a weight with more than `threshold` elements is fully replicated although the rules would shard
    one of its axes over a mesh axis of size > 1 (a forgotten annotation, a model built outside the mesh).

    arrays: a pytree of placed jax.Arrays; logical: the same structure with tuples of logical names (or None).
    """
    flat_a = jax.tree_util.tree_flatten_with_path(arrays)[0]
    flat_l = jax.tree_util.tree_leaves(logical, is_leaf=lambda x: x is None or isinstance(x, tuple))
    if len(flat_a) != len(flat_l):
        raise ShardingError(f"check_param_sharding: {len(flat_a)} arrays but {len(flat_l)} logical-axis entries")
    table = dict(rules)
    bad = []
    for (path, arr), names in zip(flat_a, flat_l):
        if arr.size <= threshold or not names:
            continue
        wanted = [(n, a) for n in names if n is not None for a in table.get(n, ()) if mesh.shape[a] > 1]
        if wanted and arr.sharding.is_fully_replicated:
            bad.append(f"{jax.tree_util.keystr(path)} {tuple(arr.shape)} logical {tuple(names)}: rules shard "
                       + ", ".join(f"{n}->{a}" for n, a in wanted))
    if bad:
        raise ShardingError(
            "weights above config.mesh.replicated_param_threshold="
            f"{threshold} elements are fully replicated although config.mesh.rules shard them (mesh "
            f"{dict(mesh.shape)}): " + "; ".join(bad)
            + ". Place them with parallel.state_shardings (or make the dimension divisible by the mesh axes).")


# --------------------------------------------------------------------------------------------------------------
# Global batches.


def make_global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Each process's slice of the batch (leading axis) -> one global array per field, split over the batch axes."""
    sharding = NamedSharding(mesh, batch_spec(rules, mesh))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
