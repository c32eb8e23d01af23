"""Run checkpoints: one orbax CheckpointManager per run directory (docs/architecture.md; MaxText's
checkpointing).

Each step directory `<workdir>/checkpoints/<step>/` holds three items:
  - `state`: the train state pytree (params, optimizer state, step, RNG, temperature, non-finite counters);
  - `data`: the Grain iterator state, one JSON file per process (`grain.checkpoint.CheckpointSave`);
  - `config`: the resolved config as JSON.
Saves are asynchronous (the step's arrays are copied off the devices, then written in the background), every
`config.checkpoint.every` steps, on preemption, and when forced (end of run, SIGTERM). The latest
`config.checkpoint.keep` are kept, plus the best `keep_best` by `config.checkpoint.best_metric` once evaluation
reports metrics. Orbax writes a step to a temporary directory and renames it when complete (on GCS: a
`commit_success.txt` marks it complete), so a crash mid-save leaves no step behind.

Damage after the fact (a truncated or corrupted file, a missing one) is found by `MANIFEST`: once a step is
complete (before the next save starts, and at the end) mlret writes `<step>/mlret_manifest.json`, every file's
size and CRC32C (on GCS read from the object metadata, locally computed). A restore checks the step against it
first and names the step and the file that differ; a damaged step (or one that fails to read) is skipped with a
warning naming both, and the previous one restored, or the run stops (`config.checkpoint.on_damaged="stop"`).
Every storage operation here is bounded (`mlret.storage.bounded`: the listing, each save, the asynchronous
commit, the restore).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

import google_crc32c
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from mlret import storage
from mlret.config import default_config

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "mlret_manifest.json"


def checkpoint_dir(workdir: str | os.PathLike[str]) -> epath.Path:
    """`<workdir>/checkpoints`, local or gs:// (`mlret.storage.path`)."""
    return storage.path(workdir, "config.workdir") / CHECKPOINT_DIR


def config_from_dict(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The schema's defaults overwritten by a saved (JSON) config; lists back to tuples where the schema has tuples.

    A field the schema no longer knows is reported (an old run) rather than silently dropped.
    """
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


class CheckpointDamagedError(RuntimeError):
    """The newest checkpoint step is damaged and `config.checkpoint.on_damaged` is "stop"; names step and file."""


def _crc32c_local(f: epath.Path) -> str:
    c = google_crc32c.Checksum()
    with open(os.fspath(f), "rb") as fh:
        while chunk := fh.read(1 << 24):
            c.update(chunk)
    return base64.b64encode(c.digest()).decode()


def file_digests(step_dir: epath.Path) -> dict[str, dict[str, Any]]:
    """{path below the step: {"size", "crc32c"}} of every file of a step but the manifest (GCS: the objects'
    metadata, nothing downloaded; local: read and summed). CRC32C base64, as GCS reports it."""
    out = {}
    if storage.is_gcs(step_dir):
        fs = storage.filesystem()
        root = os.fspath(step_dir)[len("gs://"):].rstrip("/")
        for name, info in fs.find(root, detail=True).items():
            rel = name[len(root) + 1:]
            if info.get("type") == "file" and rel and rel != MANIFEST:
                out[rel] = {"size": int(info["size"]), "crc32c": info.get("crc32c")}
        return out
    base = os.fspath(step_dir)
    for folder, _, files in os.walk(base):
        for name in files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, base)
            if rel != MANIFEST:
                out[rel] = {"size": os.path.getsize(full), "crc32c": _crc32c_local(epath.Path(full))}
    return out


def damage(step_dir: epath.Path) -> str | None:
    """Why a complete step differs from its manifest ("<file>: truncated ..."), or None (intact, or written before
    manifests / killed before its manifest was written: then only reading it tells)."""
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return None
    try:
        want = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{MANIFEST}: unreadable ({type(e).__name__})"
    have = file_digests(step_dir)
    for rel, w in sorted(want.items()):
        h = have.get(rel)
        if h is None:
            return f"{rel}: missing"
        if h["size"] != w["size"]:
            return f"{rel}: {h['size']} bytes, {w['size']} when written (truncated or rewritten)"
        if w.get("crc32c") and h.get("crc32c") and h["crc32c"] != w["crc32c"]:
            return f"{rel}: CRC32C {h['crc32c']}, {w['crc32c']} when written (corrupted)"
    return None


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
        self.on_damaged = str(ck.get("on_damaged", "previous"))
        self.sigterm_grace_s = float(ck.get("sigterm_grace_s", 25.0))
        self._unsealed: int | None = None  # the last step saved, whose manifest is not written yet
        self._commit_watch: int | None = None
        with storage.bounded("checkpoint open", self.directory):  # lists the steps, removes partial saves
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ----------------------------------------------------------------------------------------------- save

    def save(self, step: int, state: Any, data_iterator: Any, config: ml_collections.ConfigDict, *,
             metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
        """Save if the policy says so (or `force`); returns whether a save started. Call on every process."""
        if not force and not self.manager.should_save(step):
            return False
        self.wait()  # the previous save complete (orbax would wait too) and sealed before this one starts
        args = {"state": ocp.args.PyTreeSave(state), "config": ocp.args.JsonSave(config.to_dict())}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        target = self.directory / str(step)
        with storage.bounded("checkpoint save", target):
            saved = self.manager.save(step, args=ocp.args.Composite(**args),
                                      metrics=dict(metrics) if metrics else None, force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
            self._unsealed = step
            # The background commit (array writes, metadata, the rename / commit marker) is bounded too.
            self._commit_watch = storage.watch("checkpoint commit", target,
                                               lambda: not self.manager.is_saving_in_progress())
        return saved

    def wait(self) -> None:
        """Block until the pending asynchronous save is on disk, then write its manifest (process 0)."""
        step = self._unsealed
        with storage.bounded("checkpoint commit", self.directory / str(step) if step is not None
                             else self.directory):
            self.manager.wait_until_finished()
        if self._commit_watch is not None:
            storage.disarm(self._commit_watch)
            self._commit_watch = None
        if step is not None:
            self._unsealed = None
            self._seal(step)

    def _seal(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        step_dir = self.directory / str(step)
        with storage.bounded("checkpoint manifest", step_dir / MANIFEST):
            if not step_dir.exists():  # not saved after all (a step orbax declined)
                return
            files = file_digests(step_dir)
            (step_dir / MANIFEST).write_text(json.dumps({"step": step, "files": files}, sort_keys=True))

    def close(self) -> None:
        self.wait()
        with storage.bounded("checkpoint close", self.directory):
            self.manager.close()

    # ----------------------------------------------------------------------------------------------- restore

    def steps(self) -> list[int]:
        with storage.bounded("checkpoint listing", self.directory):
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
            with storage.bounded("checkpoint verify", self.directory / str(s)):
                why = damage(self.directory / str(s))
            if why is not None:
                self._damaged(s, why, step is not None or s != candidates[-1])
                continue
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
                with storage.bounded("checkpoint restore", self.directory / str(s)):
                    restored = self.manager.restore(s, args=ocp.args.Composite(**args))
            except storage.StorageError as e:
                if not _is_damage(e):
                    raise  # the storage failed, not the step: a restart may read it
                self._damaged(s, str(e).split(" failed: ", 1)[-1], step is not None or s != candidates[-1])
                continue
            except Exception as e:  # orbax/tensorstore raise many types for a damaged step
                if step is not None:
                    raise
                self._damaged(s, f"{type(e).__name__}: {_one_line(e)}", s != candidates[-1])
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

    def _damaged(self, step: int, why: str, has_previous: bool) -> None:
        """Report a damaged step: stop (on_damaged="stop"), or move it aside to `<workdir>/checkpoints_damaged/`
        (kept for a look; orbax would refuse to save that step again) and go on with the previous one."""
        where = f"checkpoint step {step} in {self.directory} is damaged: {why}"
        if self.on_damaged == "stop":
            raise CheckpointDamagedError(f"{where}; stopping (config.checkpoint.on_damaged='stop'). Remove or "
                                         f"move {self.directory / str(step)} to resume from the step before it")
        aside = self.directory.parent / f"{CHECKPOINT_DIR}_damaged" / f"{step}-{uuid.uuid4().hex[:8]}"
        log.warning("%s; moved to %s; %s", where, aside, "trying the previous step" if has_previous
                    else "no earlier step")
        _barrier(f"mlret-damaged-{step}-a")  # every process has looked at the step before it moves
        if jax.process_index() == 0:
            storage.move_dir(self.directory / str(step), aside)
        _barrier(f"mlret-damaged-{step}-b")
        with storage.bounded("checkpoint listing", self.directory):
            self.manager.reload()  # the manager's own list of steps still holds the moved one

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return config_from_dict(restored["config"])


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:500]


def _is_damage(e: storage.StorageError) -> bool:
    """A read that failed because the step's data is bad (tensorstore: DATA_LOSS, a checksum, a short read, a
    missing file), not because the storage did not answer."""
    text = str(e)
    return any(k in text for k in ("DATA_LOSS", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE", "corrupt",
                                    "Checksum", "checksum", "truncated", "Unexpected end", "FileNotFoundError",
                                    "JSONDecodeError", "INVALID_ARGUMENT"))


def restore_for_export(run_dir: str | os.PathLike[str], step: int | None = None) -> tuple[
        ml_collections.ConfigDict, Any, Any]:
    """(config, DualEncoder, TextTokenizer) of a run's checkpoint (latest readable step by default) on this host.

    The model's architecture and tokenizer come from `config.model.name` (the folder or hub id it was trained
    from), its weights from the checkpoint; only the parameters are read.
    """
    from mlret.models import load_dual_encoder  # lazy: transformers after mlret.train's setup_logging

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
        why = damage(directory / str(s))
        if why is not None:
            if step is not None:
                raise CheckpointDamagedError(f"checkpoint step {s} in {directory} is damaged: {why}")
            log.warning("checkpoint: step %d in %s is damaged: %s; trying the previous step", s, directory, why)
            errors.append(s)
            continue
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
