"""Dead-worker faults: kill -9 one process of a multi-process `python -m mlret.train` run at a chosen moment (a
step, a checkpoint save, an evaluation) and time how the others end (mlret/supervise.py: one line, status 76).

Used by tests/test_multihost.py (one kill per CI run) and scripts/worker_faults.py (the campaign whose table is in
docs/robustness.md, "A dead worker").
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from mlret.supervise import EXIT_PEER
from mlret.testing.soak import complete_steps, last_logged_step, partial_steps

POINTS = ("step", "save", "eval")


@dataclasses.dataclass
class WorkerKill:
    """One multi-process start whose process `victim` was killed at `point`."""

    point: str
    victim: int
    killed: bool = False
    killed_at_step: int = 0  # the last step metrics.jsonl held at the kill
    during_save: bool = False  # an orbax temporary step directory existed at the kill
    complete_after: list[int] = dataclasses.field(default_factory=list)  # complete checkpoint steps afterwards
    codes: list[int | None] = dataclasses.field(default_factory=list)  # every process's exit status
    survivor_seconds: list[float] = dataclasses.field(default_factory=list)  # kill -> exit, each survivor
    survivor_lines: list[str] = dataclasses.field(default_factory=list)  # each survivor's last stderr line

    @property
    def survivors(self) -> list[int]:
        return [i for i in range(len(self.codes)) if i != self.victim]

    def bounded(self, bound_s: float) -> bool:
        """Every survivor exited with EXIT_PEER within `bound_s` of the kill."""
        return all(self.codes[i] == EXIT_PEER for i in self.survivors) and bool(self.survivor_seconds) and max(
            self.survivor_seconds) <= bound_s


def _training_process(pid: int) -> int:
    """The process that trains: the supervised child of `python -m mlret.train` (mlret/supervise.py), or the
    process itself when it is not supervised."""
    deadline = time.time() + 120
    while time.time() < deadline:
        kids = psutil.Process(pid).children()
        if kids:
            return kids[0].pid
        time.sleep(0.05)
    return pid


def _moment_reached(point: str, workdir: Path, out0: Path, at_step: int, seen: set[str]) -> bool:
    if point == "step":
        return last_logged_step(workdir) >= at_step
    if point == "save":  # orbax's temporary directory of a step after `at_step` appeared
        fresh = [n for n in set(partial_steps(workdir)) - seen if int(n.split(".")[0]) > at_step]
        return bool(fresh)
    text = out0.read_text(errors="replace") if out0.exists() else ""
    return f"eval step {at_step}" in text or any(f"eval step {s}:" in text for s in range(at_step, at_step + 100))


def kill_a_worker(cmds: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], workdir: str | os.PathLike[str], *,
                  point: str, victim: int, rng: random.Random, log_dir: str | os.PathLike[str],
                  at_step: int = 6, delay_s: tuple[float, float] = (0.0, 0.5), timeout_s: float = 600.0
                  ) -> WorkerKill:
    """Start the processes of one run (`cmds[i]` with `envs[i]`), wait for `point` (step: metrics.jsonl holds step
    `at_step`; save: a checkpoint after step `at_step` is being written; eval: process 0 printed the evaluation of
    step `at_step` or later), SIGKILL the training process of `victim` after `delay_s` (uniform), and wait for the
    others to end (all are killed at `timeout_s`). Kill and exits are timed here, from outside."""
    if point not in POINTS:
        raise ValueError(f"point {point!r}: one of {POINTS}")
    workdir, log_dir = Path(workdir), Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    result = WorkerKill(point, victim)
    files = [(open(log_dir / f"p{i}.out", "w"), open(log_dir / f"p{i}.err", "w")) for i in range(len(cmds))]
    procs = [subprocess.Popen(list(c), stdout=o, stderr=e, env=env) for c, env, (o, e) in zip(cmds, envs, files)]
    seen = set(partial_steps(workdir))  # leftovers of an earlier start
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if _moment_reached(point, workdir, log_dir / "p0.out", at_step, seen):
                break
            time.sleep(0.005)
        else:
            return result  # a process ended before the moment came (or the timeout): not killed
        time.sleep(rng.uniform(*delay_s))
        result.during_save = bool(partial_steps(workdir))
        result.killed_at_step = last_logged_step(workdir)
        os.kill(_training_process(procs[victim].pid), signal.SIGKILL)  # a process this function started, by pid
        killed_at = time.monotonic()
        result.killed = True
        ended: dict[int, float] = {}
        while time.time() < deadline and len(ended) < len(procs):
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic() - killed_at
            time.sleep(0.05)
        result.survivor_seconds = [ended[i] for i in sorted(ended) if i != victim]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for o, e in files:
            o.close(), e.close()
    result.codes = [p.returncode for p in procs]
    for i in result.survivors:
        lines = (log_dir / f"p{i}.err").read_text(errors="replace").strip().splitlines()
        result.survivor_lines.append(lines[-1] if lines else "")
    result.complete_after = complete_steps(workdir)
    return result
