"""Robustness drivers for long runs: kill -9 / restart soaks of `python -m mlret.train`, and a resource monitor
(resident memory, XLA compilations) for in-process soak runs.

`kill_soak` starts the train command in one run directory again and again and kills it with SIGKILL at random
moments: half of the kills aim at a checkpoint write (the moment orbax's temporary step directory appears, plus a
random few milliseconds), the others at a random time after the run has started stepping. After every kill it
records which complete steps are on disk; the next start must resume from the newest of them (orbax discards the
half-written one), and the last start runs to the end. Whether the final parameters and every step's loss equal
an uninterrupted run's is left to the caller (scripts/soak.py, tests/test_faults.py), which has that run.

`ResourceMonitor`, a loop hook (`mlret.loop.Hook`), samples the process's resident set size in a thread, each sample
tagged with the loop's current step, and counts backend compilations through `jax.monitoring`, so a soak can show
that memory stays flat and nothing recompiles after warm-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import psutil

from mlret.hostmem import heap_in_use
from mlret.loop import Hook, Loop

CHECKPOINTS = "checkpoints"
_RESUMED = re.compile(r"resumed from \S+ at step (\d+)")
# The event jax records for every XLA backend compilation (jax/_src/dispatch.py, BACKEND_COMPILE_EVENT).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def complete_steps(workdir: str | os.PathLike[str]) -> list[int]:
    """Checkpoint steps on disk that orbax finished (a directory named by its number; temporaries are not)."""
    d = Path(workdir) / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def partial_steps(workdir: str | os.PathLike[str]) -> list[str]:
    """Names of orbax's temporary (being written) step directories."""
    d = Path(workdir) / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if "orbax-checkpoint-tmp" in p.name)


def last_logged_step(workdir: str | os.PathLike[str]) -> int:
    """The step of the last complete line of the run's metrics.jsonl (0 without one); reads only the file's end."""
    f = Path(workdir) / "metrics.jsonl"
    try:
        with open(f, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            lines = fh.read().split(b"\n")
    except FileNotFoundError:
        return 0
    for line in reversed(lines[:-1] if lines and lines[-1] else lines):  # a last line without "\n" may be partial
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def resumed_step(stderr: str) -> int | None:
    """The step a train run says it resumed from (None: it started from scratch)."""
    m = _RESUMED.search(stderr)
    return int(m.group(1)) if m else None


@dataclasses.dataclass
class Attempt:
    """One start of the train command in the soak."""

    index: int
    mode: str  # "save": kill during a checkpoint write; "random": at a random moment; "final": run to the end
    expected_resume: int | None  # newest complete step on disk when it started (None: none)
    resumed_from: int | None = None  # what the run said it resumed from
    killed: bool = False
    during_save: bool = False  # a temporary step directory existed at the moment of the kill
    last_step: int = 0  # last step logged before it died / finished
    steps_on_disk_after: list[int] = dataclasses.field(default_factory=list)
    returncode: int | None = None
    seconds: float = 0.0

    @property
    def resumed_correctly(self) -> bool:
        return self.resumed_from == self.expected_resume


def kill_soak(cmd: Sequence[str], workdir: str | os.PathLike[str], *, kills: int, seed: int,
              env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
              random_window_s: tuple[float, float] = (0.0, 3.0), save_delay_s: tuple[float, float] = (0.0, 0.05),
              attempt_timeout_s: float = 600.0, log_dir: str | os.PathLike[str] | None = None,
              max_attempts: int | None = None, random_after_new_checkpoint: bool = False) -> list[Attempt]:
    """Start `cmd` (a train command writing to `workdir`) `kills` times, SIGKILL each start at a random moment
    (alternating: during a checkpoint write, at a random time after stepping began), then once more to the end.

    Returns one `Attempt` per start, the last one the uninterrupted finish. A start that finishes before its kill
    comes (the run was nearly done) ends the soak early: the caller sees fewer kills than asked.
    `random_after_new_checkpoint`: a "random" kill's window opens only once this start has completed a checkpoint
    of its own (so that the next start must resume mid-run, not from where this one began).
    """
    rng = random.Random(seed)
    workdir = Path(workdir)
    log_dir = Path(log_dir) if log_dir is not None else workdir.parent / f"{workdir.name}_soak_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    attempts: list[Attempt] = []
    max_attempts = max_attempts or 3 * kills + 3
    while len(attempts) < max_attempts:
        done_kills = sum(a.killed for a in attempts)
        mode = "final" if done_kills >= kills else ("save" if done_kills % 2 == 0 else "random")
        steps = complete_steps(workdir)
        a = Attempt(index=len(attempts), mode=mode, expected_resume=steps[-1] if steps else None)
        attempts.append(a)
        out_path, err_path = log_dir / f"attempt{a.index}.out", log_dir / f"attempt{a.index}.err"
        t0 = time.time()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=cwd)
            try:
                # "Stepping began" = a step logged past everything metrics.jsonl held before this start (the file
                # keeps a killed run's steps after its last checkpoint until the restart truncates them).
                a.killed, a.during_save = _wait_and_kill(
                    proc, workdir, mode, rng, random_window_s, save_delay_s, last_logged_step(workdir),
                    attempt_timeout_s, (a.expected_resume or 0) if random_after_new_checkpoint else None)
            finally:
                if proc.poll() is None:  # timeout or an error in this driver: never leave the child running
                    proc.kill()
                proc.wait()
        a.seconds = time.time() - t0
        a.returncode = proc.returncode
        a.resumed_from = resumed_step(err_path.read_text(errors="replace"))
        a.last_step = last_logged_step(workdir)
        a.steps_on_disk_after = complete_steps(workdir)
        if not a.killed:
            break  # finished (or failed: the caller checks returncode)
    return attempts


def _wait_and_kill(proc: subprocess.Popen, workdir: Path, mode: str, rng: random.Random,
                   random_window_s: tuple[float, float], save_delay_s: tuple[float, float], start_step: int,
                   timeout_s: float, newer_than: int | None) -> tuple[bool, bool]:
    """Wait for the moment `mode` asks for and SIGKILL the process: (killed, a step was being written)."""
    deadline = time.time() + timeout_s
    seen = set(partial_steps(workdir))  # leftovers of an earlier kill, cleaned up by the run at start
    kill_at = None
    while time.time() < deadline:
        if proc.poll() is not None:
            return False, False
        if mode == "save":
            fresh = set(partial_steps(workdir)) - seen
            if fresh:
                time.sleep(rng.uniform(*save_delay_s))
                break
            seen &= set(partial_steps(workdir))  # a leftover removed by orbax's cleanup may come back as new
            time.sleep(0.002)
        elif mode == "random":
            armed = newer_than is None or any(s > newer_than for s in complete_steps(workdir))
            if kill_at is None and armed and last_logged_step(workdir) > start_step:
                kill_at = time.time() + rng.uniform(*random_window_s)
            if kill_at is not None and time.time() >= kill_at:
                break
            time.sleep(0.005)
        else:  # final
            time.sleep(0.1)
    else:
        proc.kill()
        raise TimeoutError(f"kill_soak: the train process did not reach its {mode!r} moment in {timeout_s:.0f} s")
    during_save = bool(partial_steps(workdir))
    if proc.poll() is not None:
        return False, False
    os.kill(proc.pid, signal.SIGKILL)  # the child this driver started, by pid
    proc.wait()
    return True, during_save


# The soak's memory criterion, in MiB per 1000 steps after warm-up (`memory_verdict`): the least-squares slope of
# the bytes malloc has handed out and not got back (`heap_in_use`: native buffers, jax's CPU arrays, numpy arrays
# and Python objects over 512 bytes) at most 0.5, so a leak of 1 MiB per 1000 steps (1 KiB a step) fails; and the
# slope of resident memory at most 5, a coarse bound on everything else (Python's small objects live in its own
# arenas, outside malloc's count: `sys.getallocatedblocks()` is reported beside it). Resident memory is what the
# machine pays, but the allocator's retained free chunks move it by +-10-15 MiB from one evaluation cycle to the
# next, so its slope over 9,000 steps is known only to a few MiB per 1000 steps (docs/robustness.md lists the runs).
# tests/test_soak.py checks both bounds on real memory.
MAX_SLOPE_MIB_PER_1000_STEPS = 0.5
MAX_RSS_SLOPE_MIB_PER_1000_STEPS = 5.0
MIB = 2**20


def memory_slope(samples: Sequence[tuple[float, int, int]], warmup_step: int, bin_steps: int = 0) -> float:
    """Least-squares slope of RSS against the step after `warmup_step`, in MiB per 1000 steps.

    `samples` are (seconds, step, rss bytes). The fit is to the median RSS of each bin of `bin_steps` steps
    (default: 1/50 of the span after warm-up, at least 1 step), so that the brief peaks of an evaluation or a
    checkpoint write, which a 0.5 s sampler catches by chance, weigh like any other moment and a steady rise
    (a leak) decides the slope."""
    after = [(s, r) for _, s, r in samples if s > warmup_step]
    if len(after) < 4:
        raise ValueError(f"memory_slope: only {len(after)} samples after step {warmup_step}; run longer or sample "
                         "more often")
    span = after[-1][0] - warmup_step
    width = bin_steps or max(span // 50, 1)
    bins: dict[int, list[int]] = {}
    for s, r in after:
        bins.setdefault((s - warmup_step - 1) // width, []).append(r)
    xs = [warmup_step + (k + 0.5) * width for k in sorted(bins)]
    ys = [float(sorted(bins[k])[len(bins[k]) // 2]) for k in sorted(bins)]
    if len(xs) < 2:
        raise ValueError(f"memory_slope: the samples after step {warmup_step} fall in one bin of {width} steps")
    return 1000.0 * _slope(xs, ys) / MIB


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def memory_verdict(samples: Sequence[tuple[float, int, int]], warmup_step: int,
                   heap: Sequence[tuple[float, int, int]] | None = None,
                   limit: float = MAX_SLOPE_MIB_PER_1000_STEPS,
                   rss_limit: float = MAX_RSS_SLOPE_MIB_PER_1000_STEPS) -> dict[str, Any]:
    """The soak's memory criterion on (seconds, step, bytes) samples of RSS and of `heap_in_use`: `memory_slope`
    of each after `warmup_step`; passes when the heap's is at most `limit` and RSS's at most `rss_limit` (without
    heap samples, where `allocator()` is unknown, RSS is held to `limit`). The RSS slope over the second half of
    the steps after warm-up is reported beside them, not judged: its error is larger still."""
    last = max((s for _, s, _ in samples), default=0)
    mid = (warmup_step + last) // 2
    rss, half = memory_slope(samples, warmup_step), memory_slope(samples, mid)
    heap_slope = memory_slope(heap, warmup_step) if heap else None
    passed = rss <= limit if heap_slope is None else (heap_slope <= limit and rss <= rss_limit)
    return {"slope_after_warmup": rss, "heap_slope_after_warmup": heap_slope, "slope_second_half": half,
            "second_half_from": mid, "limit": limit, "rss_limit": rss_limit if heap_slope is not None else limit,
            "passed": passed}


def _live_arrays() -> tuple[int, int]:
    """(count, bytes) of the live jax arrays. The list jax returns is dropped here, before the caller goes on:
    a list kept until the next sample would be alive during it and be counted into the next list, and so on,
    keeping every array ever sampled alive (a leak the monitor itself would make and then measure)."""
    live = jax.live_arrays()
    count, nbytes = len(live), sum(a.nbytes for a in live)
    del live
    return count, nbytes


class ResourceMonitor(Hook):
    """Resident memory samples and XLA compilations of this process during a training run, as a loop hook.

    Pass it to the loop (`mlret.train.train(config, workdir, hooks=[monitor])`): from `begin` to `close`,
    `samples` holds (seconds, step, rss bytes) every `interval_s` and `compiles` (seconds, step) of every backend
    compilation, `step` being the loop's last dispatched step at that moment.
    """

    def __init__(self, interval_s: float = 0.5, counters_every_s: float = 10.0) -> None:
        self.interval_s = float(interval_s)
        self.counters_every_s = float(counters_every_s)
        self.samples: list[tuple[float, int, int]] = []
        # (seconds, step, live jax arrays, their bytes, Python's allocated blocks, malloc's bytes in use or -1)
        # every `counters_every_s`: exact counts where RSS is noisy, to tell a device-buffer, Python-heap or
        # native-heap leak from the allocator's own churn.
        self.counters: list[tuple[float, int, int, int, int, int]] = []
        self.compiles: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: Loop | None = None
        self._t0 = 0.0

    def _step(self) -> int:
        return self._loop.step if self._loop is not None else 0

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.compiles.append((time.time() - self._t0, self._step()))

    def _sample(self) -> None:
        proc = psutil.Process()
        next_count = 0.0
        while not self._stop.is_set():
            now = time.time() - self._t0
            self.samples.append((now, self._step(), proc.memory_info().rss))
            if now >= next_count:
                heap = heap_in_use()
                self.counters.append((now, self._step(), *_live_arrays(), sys.getallocatedblocks(),
                                      -1 if heap is None else heap))
                next_count = now + self.counters_every_s
            self._stop.wait(self.interval_s)

    def begin(self, loop: Loop) -> None:
        self._loop = loop
        self._t0 = time.time()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        self._thread = threading.Thread(target=self._sample, daemon=True, name="mlret-resource-monitor")
        self._thread.start()

    def close(self, loop: Loop) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            jax.monitoring.unregister_event_duration_listener(self._on_event)
            self._thread = None

    def counter_trends(self, warmup_step: int) -> dict[str, float]:
        """Least-squares slopes, per 1000 steps after `warmup_step`, of the exact counters: live jax arrays,
        their MiB, and Python's allocated blocks (plus their first and last values)."""
        rows = [c for c in self.counters if c[1] > warmup_step]
        if len(rows) < 2 or rows[0][1] == rows[-1][1]:
            return {}
        xs = [float(c[1]) for c in rows]
        out: dict[str, float] = {}
        for name, col, scale in (("live_arrays", 2, 1.0), ("live_mib", 3, MIB), ("python_blocks", 4, 1.0),
                                 ("heap_mib", 5, MIB)):
            ys = [c[col] / scale for c in rows]
            out[f"{name}_per_1000_steps"] = 1000.0 * _slope(xs, ys)
            out[f"{name}_first"], out[f"{name}_last"] = ys[0], ys[-1]
        return out

    def heap_samples(self) -> list[tuple[float, int, int]]:
        """(seconds, step, malloc's bytes in use) of the counter samples (empty where `heap_in_use` is None)."""
        return [(c[0], c[1], c[5]) for c in self.counters if c[5] >= 0]

    def compiles_after(self, step: int) -> list[tuple[float, int]]:
        return [c for c in self.compiles if c[1] > step]

    def rss_growth(self, warmup_step: int, window: float = 0.1) -> dict[str, Any]:
        """Resident memory after warm-up: the median of the samples in the last `window` of the steps against the
        median of the first `window` after `warmup_step` ("growth": the steady level, what a leak raises), the
        same for the largest samples ("peak_growth": evaluations and checkpoint writes come and go, and a 0.5 s
        sampler catches their peaks only by chance), and `memory_slope` (the soak's criterion), MiB per 1000 steps."""
        after = [(s, r) for _, s, r in self.samples if s > warmup_step]
        if len(after) < 4:
            raise ValueError(f"ResourceMonitor: only {len(after)} samples after step {warmup_step}; run longer or "
                             "sample more often")
        last_step = after[-1][0]
        span = max(last_step - warmup_step, 1)
        first = sorted(r for s, r in after if s <= warmup_step + window * span) or [after[0][1]]
        last = sorted(r for s, r in after if s >= last_step - window * span)
        median = lambda xs: float(xs[len(xs) // 2])
        rss = [float(r) for _, r in after]
        verdict = memory_verdict(self.samples, warmup_step, self.heap_samples() or None)
        return {"baseline_bytes": median(first), "final_bytes": median(last),
                "growth": median(last) / median(first) - 1.0,
                "baseline_peak_bytes": float(first[-1]), "final_peak_bytes": float(last[-1]),
                "peak_growth": last[-1] / first[-1] - 1.0,
                "verdict": verdict, "slope_mib_per_1000_steps": verdict["slope_after_warmup"],
                "max_bytes": float(max(rss)), "samples": float(len(after))}
