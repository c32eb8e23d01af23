"""The library's loop hooks (`mlret.loop.Hook`): metric logs, the non-finite stop, periodic evaluation,
preemption, checkpoints and the export at the end. `mlret.train.train` wires them in this order:

    NonFiniteStop, Evaluation, MetricLog, Preemption, Checkpointing, Export, TrimHostMemory

(the order matters where one hook reads what another wrote on the loop: the checkpoint is saved with the
evaluation's metrics and forced when preemption asked to stop; the zero-shot evaluation of `Evaluation.begin`
runs before `MetricLog.begin` starts the steps/s clock).

The hooks read no config: `hook_specs(config, workdir)` freezes what each needs into small dataclasses once, right
after validation (`HookSpecs`: `EvalSpec`, `ExportSpec`, scalars). The one whole config a hook holds is
`HookSpecs.record`, a private copy recorded as data (the checkpoint's config item, the model card's training
description), never read for behaviour.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.experimental import multihost_utils

from mlret import storage
from mlret.console import sample_sizes, zero_shot_from_log
from mlret.eval import flat_metrics, run_evaluators
from mlret.eval.encode import EmbedSpec, embed_spec
from mlret.export import export_model
from mlret.hostmem import allocator, libc
from mlret.loop import Hook, Loop
from mlret.metrics_log import Progress, read_metrics
from mlret.models import resolve_model_dir

log = logging.getLogger("mlret.train")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What the `Evaluation` hook needs of a validated config (config.eval, the start model's name)."""

    every: int  # config.eval.every: evaluate every `every` steps and at the last one
    at_start: bool = False  # config.eval.at_start: evaluate the start model of a run that starts at step 0
    output_dir: str = ""  # config.eval.output_dir ("": <workdir>/eval/step_<n>)
    model_name: str = ""  # config.model.name: the folder or hub id whose tokenizer evaluation uses
    embed: EmbedSpec | None = None  # lengths, prefixes, batch size, rules (mlret.eval.encode.embed_spec)


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What the `Export` hook needs of a validated config: where to write, and what to record.

    `model_config` (config.model) and `run_config` (the whole config) are data the exported folder records (its
    model card's training description and lengths, mlret.export.export_model), not settings of the hook."""

    out: Any  # config.export.dir (relative: under the workdir) as an epath.Path (mlret.storage.join)
    model_config: Any
    run_config: Any


@dataclasses.dataclass(frozen=True)
class HookSpecs:
    """What the library's hooks need of a validated config, read once (`hook_specs`)."""

    max_nonfinite_in_row: int  # config.optim.max_nonfinite_in_row
    log_every: int  # config.train.log_every
    evaluation: EvalSpec | None  # None: config.eval.every == 0
    export: ExportSpec | None  # None: no config.export.dir
    trim_host_memory_every: int  # config.train.trim_host_memory_every (0: never)
    # The validated config as data to record (a private copy: the checkpoint's config item, the model card);
    # no hook reads it for behaviour.
    record: Any = dataclasses.field(repr=False, compare=False, default=None)


def eval_spec(config: ml_collections.ConfigDict) -> EvalSpec:
    """The evaluation's frozen view of a validated config (also for `evaluate_params` outside a run)."""
    return EvalSpec(every=int(config.eval.every), at_start=bool(config.eval.at_start),
                    output_dir=str(config.eval.output_dir or ""), model_name=str(config.model.name),
                    embed=embed_spec(config))


def hook_specs(config: ml_collections.ConfigDict, workdir: str | Path) -> HookSpecs:
    """The hooks' frozen view of a validated config (`mlret.config.validate`) for a run in `workdir`."""
    record = copy.deepcopy(config)
    evaluation = eval_spec(config) if config.eval.every > 0 else None
    export = (ExportSpec(out=storage.join(workdir, config.export.dir, "config.export.dir"),
                         model_config=record.model, run_config=record)
              if config.export.dir else None)
    return HookSpecs(max_nonfinite_in_row=int(config.optim.max_nonfinite_in_row),
                     log_every=int(config.train.log_every), evaluation=evaluation, export=export,
                     trim_host_memory_every=int(config.train.trim_host_memory_every or 0), record=record)


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row: training cannot recover by skipping."""


class NonFiniteStop(Hook):
    """Log every skipped (non-finite) update; raise `NonFiniteError` after `max_in_row` in a row."""

    def __init__(self, max_in_row: int, checkpoint_dir: str | Path | None = None) -> None:
        self.max_in_row = int(max_in_row)
        self.checkpoint_dir = checkpoint_dir

    def metrics(self, loop: Loop, step: int, m: Mapping[str, Any]) -> None:
        if not m["finite"]:
            log.warning("step %d: non-finite loss or gradients; the update was skipped (%d in a row, %d in total)",
                        step, int(m["nonfinite_in_row"]), int(m["nonfinite_total"]))
        if m["nonfinite_in_row"] >= self.max_in_row:
            where = (f"; the last checkpoint in {self.checkpoint_dir} holds the last good state"
                     if self.checkpoint_dir is not None else "")
            raise NonFiniteError(
                f"step {step}: the loss or gradients were non-finite for {int(m['nonfinite_in_row'])} steps in a "
                f"row (config.optim.max_nonfinite_in_row={self.max_in_row}); those updates were skipped. Lower "
                f"config.optim.learning_rate, raise config.loss.temperature or check the data{where}")


class MetricLog(Hook):
    """Every `log_every` steps (and the first and last): one record to `writer` (mlret.metrics_log.MetricWriter:
    metrics.jsonl and TensorBoard) with the steps/s since the last record, and the progress line with the ETA on
    `console` (mlret.console.Console; None: no line). With `evaluation` (the run's `Evaluation` hook) the time
    its evaluations take is left out of steps/s and the ETA, and the line says how many evaluations are still to
    run and how long the last one took."""

    def __init__(self, writer: Any, log_every: int, console: Any = None, evaluation: Evaluation | None = None) -> None:
        self.writer = writer
        self.log_every = int(log_every)
        self.console = console
        self.evaluation = evaluation
        self.progress: Any = None
        self._excluded = 0.0  # evaluation seconds already left out of the clock

    def begin(self, loop: Loop) -> None:
        self.progress = Progress(loop.total, loop.start)  # its clock starts just before the first step
        # The zero-shot evaluation (Evaluation.begin) ran before the clock started.
        self._excluded = self.evaluation.seconds if self.evaluation is not None else 0.0
        if self.console is not None and loop.start < loop.total:  # the first step compiles: a silent minute
            self.console.print(f"step {loop.start}/{loop.total}: compiling the train step, then training "
                               f"({loop.total - loop.start} steps) ...")

    def metrics(self, loop: Loop, step: int, m: Mapping[str, Any]) -> None:
        if step % self.log_every and step != loop.total and step != loop.start + 1:
            return
        if self.evaluation is not None:  # evaluations since the last record are not step time
            self.progress.exclude(self.evaluation.seconds - self._excluded)
            self._excluded = self.evaluation.seconds
        rate = self.progress.update(step)
        record = {"loss": m["loss"], "batch_type": m["batch_type"], "learning_rate": m["learning_rate"],
                  "steps_per_sec": rate}
        record.update({k: v for k, v in m.items() if k not in record})
        self.writer.write(step, record)
        if self.console is not None:
            note = self.evaluation.pending_note(step, loop.total) if self.evaluation is not None else ""
            self.console.print(self.progress.line(step, m, note))

    def close(self, loop: Loop) -> None:
        self.writer.close()


def evaluate_params(evaluators: Sequence[Any], trainer: Any, params: Any, spec: EvalSpec, step: int,
                    output_dir: str | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run `evaluators` on the model with `params` (the state's `params["model"]`) on the trainer's mesh, as
    `spec` says (`hook_specs(config, ...).evaluation`); every host must call it (same evaluators, same order).
    `tokenizer`: the run's TextTokenizer, whose Hugging Face tokenizer the evaluation shares when it is of the
    same folder (None: load the folder's). Returns {evaluator name: result}."""
    model = nnx.merge(trainer.graphdef, params, trainer.rest)
    tokenizer = spec.embed.tokenizer(str(resolve_model_dir(spec.model_name)), shared=tokenizer)
    embedder = spec.embed.embedder(model, trainer.mesh, tokenizer)
    return run_evaluators(evaluators, embedder, step, output_dir)


class Evaluation(Hook):
    """Every `spec.every` steps (config.eval.every) and at the last step: run the evaluators on the current
    weights, write their flat metrics to `writer`, print them on `console` and leave them on the loop
    (`eval_metrics` for the checkpoint's best metric, `eval_results`). Matrices go to `spec.output_dir`, else
    `<workdir>/eval/step_<n>`. With `spec.at_start`, a run that starts from step 0 is evaluated first
    (`zero_shot`: the summaries of the start model; a resumed run reads them back from metrics.jsonl).
    `tokenizer`: the run's TextTokenizer (the training data's), shared by every evaluation (`evaluate_params`)."""

    def __init__(self, evaluators: Sequence[Any], spec: EvalSpec, workdir: str | Path | None,
                 writer: Any = None, console: Any = None, tokenizer: Any = None) -> None:
        self.evaluators = list(evaluators)
        self.spec = spec
        self.tokenizer = tokenizer
        self.workdir = storage.path(workdir, "config.workdir") if workdir is not None else None
        self.writer = writer
        self.console = console
        self.every = int(spec.every)
        self.zero_shot: dict[str, dict[str, float]] | None = None
        self.seconds = 0.0  # wall time of this run's evaluations so far (MetricLog leaves it out of the ETA)
        self.last_seconds: float | None = None

    def pending_note(self, step: int, total: int) -> str:
        """What the step line's ETA leaves out: "+ 2 evaluations (next at step 20, the last took 45 s)"."""
        # A step's evaluation runs after its metrics are handled: at step 20, the evaluation of step 20 is to come.
        due = [s for s in range(step, total + 1) if s % self.every == 0 or s == total] if self.every > 0 else []
        if not due:
            return ""
        took = f", the last took {self.last_seconds:.0f} s" if self.last_seconds is not None else ""
        return (f"+ {len(due)} evaluation{'s' if len(due) > 1 else ''} (next at step {due[0]}{took})")

    def evaluate(self, loop: Loop, step: int) -> tuple[dict[str, float], dict[str, Any]]:
        """(flat metrics, results) of `loop.state`'s weights, logged and printed as the evaluation of `step`."""
        out_dir = self.spec.output_dir or (str(self.workdir / "eval" / f"step_{step}")
                                                  if self.workdir is not None else None)
        if self.console is not None:  # said before it starts: an evaluation is minutes of silence on a CPU
            took = f"; the last took {self.last_seconds:.0f} s" if self.last_seconds is not None else ""
            self.console.print(f"eval {'zero-shot (step 0)' if step == 0 else f'step {step}'}: evaluating "
                               f"{', '.join(e.name for e in self.evaluators)}{took} ...")
        t0 = time.perf_counter()
        results = evaluate_params(self.evaluators, loop.trainer, loop.state["params"]["model"], self.spec, step,
                                  out_dir, tokenizer=self.tokenizer)
        metrics = flat_metrics(results)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.last_seconds = seconds
        log.info("eval at step %d (%.1f s): %s", step, seconds, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if self.console is not None:
            self.console.evaluation(step, {name: r.block() for name, r in results.items()}, seconds,
                                    sizes=sample_sizes(results))
        return metrics, results

    def run(self, loop: Loop, write: bool = True) -> None:
        """Evaluate `loop.state` at `loop.step` now (`write`: and log the metrics to the writer)."""
        loop.eval_metrics, loop.eval_results = self.evaluate(loop, loop.step)
        if write and self.writer is not None:
            self.writer.write(loop.step, loop.eval_metrics)

    def begin(self, loop: Loop) -> None:
        if self.spec.at_start and loop.start == 0:
            metrics, results = self.evaluate(loop, 0)
            if self.writer is not None:
                self.writer.write(0, metrics)
            self.zero_shot = {name: r.summary for name, r in results.items()}

    def after_step(self, loop: Loop) -> None:
        if loop.step % self.every == 0 or loop.step == loop.total:
            loop.sync()  # the step's metrics (and the non-finite stop) before the evaluation's
            self.run(loop)

    def end(self, loop: Loop) -> None:
        if (self.zero_shot is None and self.spec.at_start and self.writer is not None and self.writer.enabled
                and self.writer.path.is_file()):
            self.zero_shot = zero_shot_from_log(read_metrics(self.writer.path.parent),
                                                [e.name for e in self.evaluators])


class Preemption(Hook):
    """SIGTERM (one process) or jax's preemption sync point (several: every host stops at the same step, asked
    through the checkpoint manager) sets `loop.stop`, so the checkpoint hook saves this step and the run ends."""

    def __init__(self, checkpointer: Any) -> None:
        self.checkpointer = checkpointer
        self.requested = False
        self._old: Any = None

    def begin(self, loop: Loop) -> None:
        # Several hosts: jax's preemption notifier owns SIGTERM.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        # A preemption gives seconds, not minutes: if the final checkpoint (or a storage wait before it) hangs,
        # the watchdog ends the process after the grace period; the last complete checkpoint stays the newest.
        grace = float(getattr(self.checkpointer, "sigterm_grace_s", 25.0))
        if not getattr(self, "_grace_armed", False):
            self._grace_armed = True
            storage.deadline("SIGTERM", getattr(self.checkpointer, "directory", ""), grace, exit_code=128 + signum,
                             message=lambda: (
                                 f"SIGTERM: the final checkpoint and exit did not finish within {grace:.0f} s "
                                 "(config.checkpoint.sigterm_grace_s)"
                                 + "".join(f"; waiting on {w}" for w in storage.in_flight()
                                           if not w.startswith("SIGTERM"))
                                 + "; exiting without it: the last complete checkpoint is the one to resume from"))

    def after_step(self, loop: Loop) -> None:
        if self.requested or (jax.process_count() > 1 and self.checkpointer.manager.reached_preemption(loop.step)):
            loop.stop = True

    def end(self, loop: Loop) -> None:
        if loop.stop:
            log.warning("SIGTERM / preemption: saved a checkpoint at step %d; exiting", loop.step)

    def close(self, loop: Loop) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


class Checkpointing(Hook):
    """Save state + data iterator + config through `checkpointer` (mlret.checkpoint.Checkpointer) on its
    schedule, and always at the last step, on a stop and with an evaluation's metrics (for the best-metric
    ranking); `close` waits for the last asynchronous write.

    `record` is the validated config (`HookSpecs.record`), saved with every checkpoint as data (a resumed or
    exported run reads it back); the hook reads nothing in it."""

    def __init__(self, checkpointer: Any, record: ml_collections.ConfigDict, writer: Any = None) -> None:
        self.checkpointer = checkpointer
        self.record = record
        self.writer = writer  # its logs are flushed to the run directory with every checkpoint (gs://: copied)

    def after_step(self, loop: Loop) -> None:
        saved = self.checkpointer.save(loop.step, loop.state, loop.batches, self.record, metrics=loop.eval_metrics,
                                       force=loop.step == loop.total or loop.stop or loop.eval_metrics is not None)
        if saved and self.writer is not None:
            loop.sync()  # this step's metrics line first: the logs in the run directory reach the checkpoint
            self.writer.flush()

    def wait(self, loop: Loop) -> None:
        self.checkpointer.wait()

    def close(self, loop: Loop) -> None:
        self.checkpointer.close()


class Export(Hook):
    """At the end of a run that was not stopped: the trained model as a Hugging Face + sentence-transformers
    folder in `spec.out` (config.export.dir; relative: under the workdir), the last evaluation's summaries in its
    card (a finished run started again evaluates first). Process 0 writes; every process takes part in the
    gather. The spec's `model_config` and `run_config` are what the card records of the run."""

    def __init__(self, tokenizer: Any, spec: ExportSpec, evaluation: Evaluation | None = None) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.out = spec.out
        self.evaluation = evaluation

    def end(self, loop: Loop) -> None:
        if loop.stop:
            return
        if self.evaluation is not None and loop.eval_results is None:
            self.evaluation.run(loop, write=False)  # a finished run started again: evaluate what is exported
        params = loop.state["params"]["model"]
        if jax.process_count() > 1:  # sharded across hosts: every process takes part in the gather
            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() == 0:
            model = nnx.merge(loop.trainer.graphdef, jax.device_get(params), loop.trainer.rest)
            results = loop.eval_results
            blocks = {name: r.block() for name, r in results.items()} if results else None
            baseline = self.evaluation.zero_shot if self.evaluation is not None else None
            export_model(model, self.tokenizer, self.spec.model_config, self.out, results=blocks,
                         baseline=baseline, run_config=self.spec.run_config)
            log.info("exported the model to %s", self.out)
        loop.export_dir = str(self.out)


class TrimHostMemory(Hook):
    """glibc's `malloc_trim(0)`: hand the heap pages that freed memory left in malloc's arenas back to the kernel,
    every `every` steps and at the ends of the run's phases: after the setup (with the zero-shot evaluation), after
    a step whose hooks evaluated (and saved its checkpoint), and after a step that compiled a new shape of the
    train step (a packed batch's first row count).

    Why: the loop's host-side churn (batches, tokenisation, host copies, evaluations; one malloc arena per thread
    of Grain, orbax and XLA) frees everything it allocates, but glibc keeps freed chunks in the arenas, and over
    thousands of steps the arenas' free part grows: in a 8,000-step soak, bytes in use by malloc stayed at
    262 MiB from step 2,000 on while the arenas' free bytes grew from 362 to 451 MiB and resident memory with
    them (docs/robustness.md). A phase leaves more at once: compiling the demo's train step left 0.54 GiB free in
    the arenas and an evaluation up to 1.2 GiB, resident under the next steps' buffers (docs/benchmarks.md, "The
    first hour"). Trimming costs milliseconds, so it runs at those few boundaries, not every step (a trimmed page
    is faulted in again when malloc reuses it). Where malloc is not glibc's (`mlret.hostmem.allocator`: tcmalloc
    or jemalloc preloaded, another C library) the hook says so once, at the start, and does nothing."""

    def __init__(self, every: int) -> None:
        self.every = int(every)
        self._trim: Any = None
        self._traces = 0  # the train step's trace count at the last look (a new shape compiled since)

    def begin(self, loop: Loop) -> None:
        name = allocator()
        if name != "glibc":
            log.info("config.train.trim_host_memory_every: the host allocator is %s, not glibc's malloc: it "
                     "returns memory its own way; no malloc_trim", name)
            return
        self._trim = libc().malloc_trim
        self._trim.argtypes, self._trim.restype = [ctypes.c_size_t], ctypes.c_int
        self._traces = loop.trainer.trace_count
        self._trim(0)  # the setup's and the zero-shot evaluation's garbage

    def after_step(self, loop: Loop) -> None:
        if self._trim is None:
            return
        compiled = loop.trainer.trace_count != self._traces
        self._traces = loop.trainer.trace_count
        if compiled or loop.eval_metrics is not None or (self.every and loop.step % self.every == 0):
            self._trim(0)
