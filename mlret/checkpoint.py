"""Run checkpoints: one orbax CheckpointManager per run directory (docs/architecture.md; MaxText's
checkpointing).

Each step directory `<workdir>/checkpoints/<step>/` holds three items:
  - `state`: the train state pytree (params, optimizer state, step, RNG, temperature, non-finite counters);
  - `data`: the Grain iterator state, one JSON file per process (`grain.checkpoint.CheckpointSave`);
  - `config`: the resolved config as JSON.
Saves are asynchronous (the step's arrays are copied off the devices, then written in the background), every
`config.checkpoint.every` steps, on preemption, and when forced (end of run, SIGTERM). The latest
`config.checkpoint.keep` are kept, plus the best `keep_best` by `config.checkpoint.best_metric` once evaluation
reports metrics. Orbax writes a step to a temporary directory and renames it when complete, so a crash mid-save
leaves no step behind; a step that is present but unreadable (truncated, corrupt) is skipped with a warning and the
previous one restored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from mlret import storage

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike[str]) -> epath.Path:
    """`<workdir>/checkpoints`, local or gs:// (`mlret.storage.path`)."""
    return storage.path(workdir, "config.workdir") / CHECKPOINT_DIR


def config_from_dict(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The schema's defaults overwritten by a saved (JSON) config; lists back to tuples where the schema has tuples.

    A field the schema no longer knows is reported (an old run) rather than silently dropped.
    """
    from mlret.config import default_config

    config = default_config()

    def fill(node: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
        for key, value in values.items():
            if key not in node:
                log.warning("saved config field %s%s is not in the schema; ignored", prefix, key)
                continue
            current = node[key]
            if isinstance(current, ml_collections.ConfigDict):
                fill(current, value, f"{prefix}{key}.")
            else:
                if isinstance(current, tuple) and isinstance(value, list):
                    value = _to_tuple(value)
                node[key] = value

    with config.unlocked():
        fill(config, saved, "")
    return config


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


class CheckpointLayoutError(RuntimeError):
    """A checkpoint that this run's process layout cannot resume exactly; the message says why."""


def _iterator_states(data_dir: epath.Path) -> dict[int, str]:
    """{process index: JSON state} of the Grain iterator states in a step's `data` item, and check they were written
    by one process count ({} when there are none)."""
    states, counts = {}, set()
    for f in data_dir.glob("process_*-of-*.json"):
        index, count = f.stem[len("process_"):].split("-of-")
        states[int(index)] = f.read_text()
        counts.add(int(count))
    if len(counts) > 1:
        raise CheckpointLayoutError(f"{data_dir}: iterator states from several process counts {sorted(counts)}")
    if states and len(states) != next(iter(counts)):
        raise CheckpointLayoutError(f"{data_dir}: {len(states)} iterator states for {next(iter(counts))} processes")
    return states


class Checkpointer:
    """The run's CheckpointManager with mlret's items and policies."""

    def __init__(self, workdir: str | os.PathLike[str], config: ml_collections.ConfigDict) -> None:
        ck = config.checkpoint
        every = int(ck.every)
        save_policies: list[Any] = [ocm.PreemptionCheckpointingPolicy()]
        if every > 0:
            save_policies.insert(0, ocm.FixedIntervalPolicy(every))
        keep: list[Any] = [ocm.LatestN(n=int(ck.keep))]
        best_fn = None
        if ck.best_metric:
            metric = str(ck.best_metric)
            best_fn = lambda metrics: float(metrics[metric])  # noqa: E731
            # BestN keeps the *last* n after sorting, ascending unless reversed: reverse for "min".
            keep.append(ocm.BestN(get_metric_fn=best_fn, reverse=ck.best_mode == "min", n=int(ck.keep_best),
                                  keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocm.AnySavePolicy(save_policies),
            preservation_policy=ocm.AnyPreservationPolicy(keep),
            best_fn=best_fn,  # makes the manager write the metrics it is given next to each step
            best_mode=str(ck.best_mode),
            enable_async_checkpointing=bool(ck.async_save),
            create=True,
            cleanup_tmp_directories=True,  # partial saves of a killed run
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ----------------------------------------------------------------------------------------------- save

    def save(self, step: int, state: Any, data_iterator: Any, config: ml_collections.ConfigDict, *,
             metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
        """Save if the policy says so (or `force`); returns whether a save started. Call on every process."""
        if not force and not self.manager.should_save(step):
            return False
        args = {"state": ocp.args.PyTreeSave(state), "config": ocp.args.JsonSave(config.to_dict())}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self.manager.save(step, args=ocp.args.Composite(**args),
                                  metrics=dict(metrics) if metrics else None, force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def wait(self) -> None:
        """Block until the pending asynchronous save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ----------------------------------------------------------------------------------------------- restore

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, abstract_state: Any, data_iterator: Any = None, *, step: int | None = None
                ) -> tuple[int, Any, Any] | None:
        """Restore the latest readable step (or `step`): (step, state, data iterator), or None without steps.

        abstract_state: ShapeDtypeStructs with shardings (`Trainer.abstract_state()`), so the arrays land on the
        current mesh whatever mesh wrote them. A step that fails to read is skipped with a warning.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        for s in candidates:
            # A step written by another number of processes (e.g. 2 hosts, resumed on 1): Grain looks for this
            # process's file (`process_i-of-n.json`) only. mlret's iterator state is a position in the sequence of
            # global steps, the same on every host, so identical states carry over to any process count; states
            # that differ between hosts cannot, and that is an error rather than a silent restart from scratch.
            states = _iterator_states(self.directory / str(s) / "data") if data_iterator is not None else {}
            remap = bool(states) and (len(states) != jax.process_count())
            if remap and len({json.dumps(json.loads(v), sort_keys=True) for v in states.values()}) != 1:
                raise CheckpointLayoutError(
                    f"checkpoint step {s} in {self.directory} was written by {len(states)} processes whose data "
                    f"iterator states differ, and this run has {jax.process_count()}: the data position cannot be "
                    f"carried over exactly. Resume with {len(states)} processes, or start a new run directory")
            try:
                args = {"state": ocp.args.PyTreeRestore(
                    item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
                if data_iterator is not None and not remap:
                    args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
                restored = self.manager.restore(s, args=ocp.args.Composite(**args))
            except Exception as e:  # orbax/tensorstore raise many types for a damaged step
                if step is not None:
                    raise
                log.warning("checkpoint: step %d in %s cannot be restored (%s: %s); trying the previous step",
                            s, self.directory, type(e).__name__, e)
                continue
            if remap:
                log.info("checkpoint: step %d was written by %d processes, restored by %d; every writer's iterator "
                         "state is the same position, which carries over", s, len(states), jax.process_count())
                data_iterator.set_state(json.loads(next(iter(states.values()))))
                if hasattr(data_iterator, "start_prefetch"):  # as grain's own CheckpointHandler.restore does
                    data_iterator.start_prefetch()
                return s, restored["state"], data_iterator
            return s, restored["state"], restored.get("data") if data_iterator is not None else None
        if candidates:
            log.warning("checkpoint: no readable step in %s (tried %s); starting from scratch", self.directory,
                        candidates)
        return None

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return config_from_dict(restored["config"])


def restore_for_export(run_dir: str | os.PathLike[str], step: int | None = None) -> tuple[
        ml_collections.ConfigDict, Any, Any]:
    """(config, DualEncoder, TextTokenizer) of a run's checkpoint (latest readable step by default) on this host.

    The model's architecture and tokenizer come from `config.model.name` (the folder or hub id it was trained
    from), its weights from the checkpoint; only the parameters are read.
    """
    from flax import nnx

    from mlret.models import load_dual_encoder

    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints (is {run_dir} a run directory of mlret.train?)")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{directory}: no complete checkpoint step")
    candidates = [step] if step is not None else list(reversed(steps))
    device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    errors = []
    for s in candidates:
        try:
            config = config_from_dict(manager.restore(s, args=ocp.args.Composite(
                config=ocp.args.JsonRestore()))["config"])
            model, tokenizer = load_dual_encoder(config)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            abstract = {"params": {"model": jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), nnx.to_pure_dict(params))}}
            restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True)))
            nnx.replace_by_pure_dict(params, restored["state"]["params"]["model"])
            model = nnx.merge(graphdef, params, rest)
            log.info("restore_for_export: step %d of %s", s, directory)
            manager.close()
            return config, model, tokenizer
        except Exception as e:
            if step is not None:
                raise
            log.warning("checkpoint: step %d in %s cannot be restored (%s: %s); trying the previous step", s,
                        directory, type(e).__name__, e)
            errors.append(s)
    manager.close()
    raise FileNotFoundError(f"{directory}: no readable checkpoint step (tried {errors})")
