"""Metric writers for training runs: `<workdir>/metrics.jsonl`, TensorBoard events, and the progress line.

(Named `metrics_log` rather than `logging` so that it never shadows the standard library's `logging`.)

Only process 0 writes. The run directory may be local or gs:// (`mlret.storage`): GCS objects cannot be appended
to, so both logs are written to local staging files and copied whole to the run directory by `flush()` (the
training loop flushes at every checkpoint save and at the end), which keeps the copy in the run directory a
complete file at every moment. On resume from step s, lines of metrics.jsonl with a step after s are dropped (they
belong to the interrupted part of the run, which is recomputed) and TensorBoard is told to purge its events after
s, so both logs read like one uninterrupted run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from mlret import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(v: Any) -> Any:
    """numpy / jax scalars -> JSON numbers (NaN/inf as strings, which JSON lacks)."""
    if isinstance(v, (str, bool)) or v is None:
        return v
    arr = np.asarray(v)
    if arr.ndim == 0:
        if arr.dtype.kind in "iu":
            return int(arr)
        if arr.dtype.kind == "b":
            return bool(arr)
        f = float(arr)
        return f if math.isfinite(f) else str(f)
    return arr.tolist()


class MetricWriter:
    """Append one JSON object per logged step to metrics.jsonl and the numbers to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike[str], *, resume_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = storage.path(workdir, "config.workdir") / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        self._staged = storage.Staged(self.path)
        if self._staged.local.exists():
            self._truncate_after(resume_step)
        self._file = self._staged.local.open("a", encoding="utf-8")
        from tensorboardX import SummaryWriter  # lazy: heavy (1.4 s to import); the jax-free CLIs import this module

        # TensorBoard writes its event files into a local folder that flush() copies to <workdir>/tensorboard.
        self._tb_target = self.path.parent / TENSORBOARD_DIR
        self._tb_dir = self._tb_target if not self._staged.remote else self._staged.local.parent / TENSORBOARD_DIR
        # purge_step: events after the resume point, from the interrupted run, are discarded by TensorBoard.
        self._tb = SummaryWriter(os.fspath(self._tb_dir), purge_step=resume_step + 1 if resume_step else None,
                                 flush_secs=30)

    def _truncate_after(self, step: int) -> None:
        kept = []
        local = self._staged.local
        for line in local.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue  # a line cut short by a kill: drop it
        local.write_text("".join(x + "\n" for x in kept), encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        """Both logs on disk, and copied to a gs:// run directory."""
        if self.enabled:
            self._file.flush()
            self._tb.flush()
            self._upload()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._file.close()
            self._upload()
            self._staged.close()

    def _upload(self) -> None:
        self._staged.flush()
        if self._staged.remote:
            storage.sync_dir(self._tb_dir, self._tb_target)


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of `<workdir>/metrics.jsonl`."""
    path = storage.path(workdir, "config.workdir") / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Progress:
    """Steps per second (over the steps since the previous report) and the ETA to `total_steps`.

    The clock starts when the object is made, just before the first step, so the first interval includes the
    step's compilation (the true throughput so far); later intervals are steady-state.
    """

    def __init__(self, total_steps: int, start_step: int) -> None:
        self.total = int(total_steps)
        self._mark_step = int(start_step)
        self._mark_time = time.perf_counter()
        self.rate = float("nan")

    def update(self, step: int) -> float:
        """Call when step `step` has finished; returns steps/s since the previous call."""
        now = time.perf_counter()
        if step > self._mark_step:
            self.rate = (step - self._mark_step) / max(now - self._mark_time, 1e-9)
        self._mark_step, self._mark_time = step, now
        return self.rate

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of wall time that went to something other than steps (an evaluation) out of steps/s
        and the ETA."""
        self._mark_time += max(0.0, float(seconds))

    def eta(self, step: int) -> str:
        if not math.isfinite(self.rate) or self.rate <= 0:
            return "?"
        return str(datetime.timedelta(seconds=round((self.total - step) / self.rate)))

    def line(self, step: int, metrics: Mapping[str, Any], note: str = "") -> str:
        """The progress line; `note` follows the ETA (e.g. the evaluations still to run, which it leaves out)."""
        loss = metrics.get("loss", float("nan"))
        rate = f"{self.rate:.2f}" if math.isfinite(self.rate) else "-"
        return (f"step {step}/{self.total} ({100.0 * step / self.total:.0f}%)  loss {float(loss):.4f}  "
                f"lr {float(metrics.get('learning_rate', float('nan'))):.3g}  {rate} steps/s  ETA {self.eta(step)}"
                + (f" {note}" if note else ""))
