"""The training loop: the one function every trainer in mlret runs (`python -m mlret.train`, `scripts/study.py`,
`scripts/soak.py`, the tests), with everything around the step in hooks.

    trainer, params = build_train_step(model, config, mesh)          # mlret.step
    loop = run_loop(trainer, trainer.init_state(params), batches, start=0, total=config.train.steps,
                    hooks=[NonFiniteStop(...), MetricLog(...), Evaluation(...), Checkpointing(...)])

Each iteration takes this process's slice of the next batch from `batches` (the hooks' `batch` may replace it),
makes it a global array, and dispatches the jitted step. The host reads a step's metrics one step later, while
the next step runs on the devices (`Loop.sync` reads them at once, e.g. before an evaluation), records the loss,
checks that the step was traced once, and hands them to the hooks' `metrics`. Then every hook's `after_step`
runs (evaluation, preemption, checkpoint, in list order); a hook that sets `loop.stop` ends the run after it.
The library's hooks are in `mlret.hooks`; test tooling (fault injection, the kill switch, the resource monitor)
is in `mlret.testing` and reaches the loop the same way.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import logging
import operator
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

log = logging.getLogger("mlret.loop")


class Hook:
    """One concern of a run around the step. Every method is optional (these do nothing); the loop calls them
    in the order of its hook list:

    - `begin(loop)`: before the first step;
    - `batch(loop, local) -> local`: this process's slice of step `loop.step + 1`'s batch, before it is placed;
    - `metrics(loop, step, m)`: the host metrics of finished step `step` (floats; `m["batch_type"]` is "mono"
      or "cross"), one step behind the devices;
    - `after_step(loop)`: once step `loop.step` is dispatched: evaluate, checkpoint, set `loop.stop`;
    - `wait(loop)`: block until this hook's asynchronous work (checkpoint writes) is done (`Loop.wait`);
    - `end(loop)`: after the last step, or after a hook stopped the run (not after an error);
    - `close(loop)`: always, in reverse order, also after an error: release files, handlers and threads.
    """

    def begin(self, loop: Loop) -> None:
        pass

    def batch(self, loop: Loop, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return local

    def metrics(self, loop: Loop, step: int, m: Mapping[str, Any]) -> None:
        pass

    def after_step(self, loop: Loop) -> None:
        pass

    def wait(self, loop: Loop) -> None:
        pass

    def end(self, loop: Loop) -> None:
        pass

    def close(self, loop: Loop) -> None:
        pass


class LossHistory(Mapping[int, float]):
    """Every step's loss of a run, step -> float, for steps `start + 1`, `start + 2`, ... in order: 8 bytes a
    step in one array (a dict of Python floats costs about 100 bytes a step, which a run of a million steps would
    keep for nothing). Compares equal to a dict with the same items."""

    def __init__(self, start: int = 0) -> None:
        self.start = int(start)
        self._values = array.array("d")

    def __setitem__(self, step: int, value: float) -> None:
        i = step - self.start - 1
        if i == len(self._values):
            self._values.append(value)
        elif 0 <= i < len(self._values):
            self._values[i] = value
        else:
            raise KeyError(f"LossHistory: step {step} is not the next step ({self.start + len(self._values) + 1})")

    def __getitem__(self, step: int) -> float:
        try:
            i = operator.index(step) - self.start - 1
        except TypeError:
            raise KeyError(step) from None
        if not 0 <= i < len(self._values):
            raise KeyError(step)
        return self._values[i]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start + 1, self.start + 1 + len(self._values)))

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"LossHistory({dict(self)!r})"


@dataclasses.dataclass
class Loop:
    """What the hooks see and change. `step` is the last dispatched step (numbered from 1, as logged) and
    `state` the train state after it; hooks write `stop`, `eval_metrics`, `eval_results` and `export_dir`."""

    trainer: Any  # mlret.step.Trainer
    state: Any
    batches: Iterator[dict[str, np.ndarray]]  # the data iterator (checkpointed with the state)
    start: int  # the step this run started from (0, or a restored checkpoint's)
    total: int
    hooks: Sequence[Hook]
    step: int = 0
    losses: LossHistory = dataclasses.field(default=None)  # type: ignore[assignment]  # every step this run ran
    stop: bool = False  # set by a hook (preemption): end the run after this step
    eval_metrics: dict[str, float] | None = None  # flat metrics of an evaluation at this step (None: none ran)
    eval_results: dict[str, Any] | None = None  # the last evaluation's results by evaluator
    export_dir: str | None = None
    _pending: tuple[int, Any, str] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.losses is None:
            self.losses = LossHistory(self.start)

    def sync(self) -> None:
        """Handle the dispatched step's metrics now (waits for it on the devices)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._handle(*pending)

    def wait(self) -> None:
        """Every hook's asynchronous work done (e.g. checkpoint writes on disk)."""
        for h in self.hooks:
            h.wait(self)

    def _handle(self, step: int, metrics: Any, batch_type: str) -> None:
        m: dict[str, Any] = {k: v.item() for k, v in jax.device_get(metrics).items()}
        m["batch_type"] = batch_type
        self.losses[step] = m["loss"]
        if self.trainer.trace_count != self.trainer.expected_traces:  # one per packed shape (1 if padded)
            raise RuntimeError(f"the train step was traced {self.trainer.trace_count} times: a batch shape or "
                               "dtype changed between steps (every batch must have the configured static shapes)")
        for h in self.hooks:
            h.metrics(self, step, m)


@contextlib.contextmanager
def compile_report(what: str) -> Iterator[None]:
    """Log how long the block took and whether jax's persistent compilation cache supplied its program."""
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


def run_loop(trainer: Any, state: Any, batches: Iterator[dict[str, np.ndarray]], *, start: int, total: int,
             hooks: Sequence[Hook] = ()) -> Loop:
    """Run `trainer.step` from step `start` to `total` on `batches` (this process's slices of the global
    batches), calling `hooks` around every step; returns the `Loop` (final state, losses, what hooks recorded).

    The first step's call traces and compiles the step (or loads it from the persistent cache) and says so in
    the log. Raises when the step is traced a second time (a batch changed shape), and whatever a hook raises
    (`mlret.hooks.NonFiniteError`); hooks are closed either way."""
    loop = Loop(trainer=trainer, state=state, batches=batches, start=start, total=total, hooks=hooks, step=start)
    with contextlib.ExitStack() as closing:
        for h in hooks:
            closing.callback(h.close, loop)
        for h in hooks:
            h.begin(loop)
        while loop.step < total:
            local = next(batches)
            for h in hooks:
                local = h.batch(loop, local)
            batch_type = "mono" if int(local["batch_type"][0]) == 0 else "cross"
            batch = trainer.global_batch(local)
            with compile_report("train step") if loop.step == start else contextlib.nullcontext():
                loop.state, metrics = trainer.step(loop.state, batch)
            loop.step += 1
            loop.sync()  # the previous step's metrics, while this step runs on the devices
            loop._pending = (loop.step, metrics, batch_type)
            loop.eval_metrics = None
            for h in hooks:
                h.after_step(loop)
            if loop.stop:
                break
        loop.sync()
        for h in hooks:
            h.end(loop)
    return loop
