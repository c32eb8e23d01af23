"""Faults: kill -9 at random moments (one during a checkpoint write) and restarts end with the uninterrupted run's
parameters and losses, every restart resuming from the newest complete checkpoint; poisoned (NaN) batches are
skipped, counted and logged while training continues, and N in a row stop the run with a clear message and the
last good checkpoint intact. scripts/soak.py runs the 10-kill version (docs/robustness.md). A damaged newest
checkpoint (a corrupted or truncated file) is named with its file and skipped, or stops the run when configured; a
full disk (a small tmpfs) fails the save with one line and keeps the last complete checkpoint."""

import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from scale_helpers import max_abs_diff
from scale_runs import DEVICES, STEPS, checkpoint_params, logged_losses, run_together, scale_env, train_cmd

from mlret.metrics_log import read_metrics
from mlret.testing.soak import complete_steps, kill_soak


def test_kill9_restarts_end_like_an_uninterrupted_run(reference_run, scale_run_args, compile_cache, tmp_path):
    workdir = tmp_path / "run"
    attempts = kill_soak(train_cmd(workdir, scale_run_args), workdir, kills=2, seed=0,
                         env=scale_env(DEVICES, compile_cache), cwd=str(tmp_path), save_delay_s=(0.0, 0.005),
                         random_window_s=(0.0, 1.0), log_dir=tmp_path / "logs", random_after_new_checkpoint=True)
    report = [(a.mode, a.killed, a.during_save, a.expected_resume, a.resumed_from, a.last_step) for a in attempts]
    assert [a.killed for a in attempts] == [True, True, False], report
    assert attempts[0].during_save, report  # the first kill hit a checkpoint write
    assert all(a.resumed_correctly for a in attempts), report  # always the newest complete step
    assert attempts[-1].returncode == 0, (tmp_path / "logs" / f"attempt{len(attempts) - 1}.err").read_text()[-3000:]
    assert attempts[-1].resumed_from, report  # the second kill came after a checkpoint: the last start resumed

    ref_losses = {int(k): v for k, v in reference_run["report"]["losses"].items()}
    losses = logged_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, STEPS + 1)] == [ref_losses[s] for s in range(1, STEPS + 1)]
    assert max_abs_diff(checkpoint_params(workdir), reference_run["params"]) <= 1e-6


def test_poisoned_batches_are_skipped_then_stop_the_run(scale_run_args, compile_cache, tmp_path):
    # One poisoned batch at step 3 (skipped, training goes on), then three in a row from step 12: the limit.
    # mlret.testing.train: mlret.train's command line with the fault hooks (mlret/testing/faults.py) armed.
    p = run_together([train_cmd(tmp_path, scale_run_args, "--inject_nan_steps=3,12,13,14",
                                "--config.optim.max_nonfinite_in_row=3", module="mlret.testing.train")],
                     [scale_env(DEVICES, compile_cache)], 600, tmp_path / "logs")[0]
    assert p.returncode not in (0, None), p.stderr[-3000:]
    assert ("NonFiniteError: step 14: the loss or gradients were non-finite for 3 steps in a row "
            "(config.optim.max_nonfinite_in_row=3)") in p.stderr
    assert "step 3: non-finite loss or gradients; the update was skipped (1 in a row, 1 in total)" in p.stderr
    assert "step 13: non-finite loss or gradients; the update was skipped (2 in a row, 3 in total)" in p.stderr

    records = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    # metrics.jsonl writes NaN as the string "nan" (JSON has no NaN).
    assert not records[3]["finite"] and math.isnan(float(records[3]["loss"])) and records[3]["nonfinite_total"] == 1
    for s in range(4, 12):  # training continued after the skipped batch
        assert records[s]["finite"] and math.isfinite(records[s]["loss"]) and records[s]["nonfinite_in_row"] == 0
        assert records[s]["nonfinite_total"] == 1
    assert [records[s]["nonfinite_in_row"] for s in (12, 13)] == [1, 2]
    assert max(records) <= 14  # stopped at the limit

    # The last good checkpoint (step 10) is complete, restores, and holds finite trained weights.
    assert complete_steps(tmp_path) == [5, 10]
    params = checkpoint_params(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert max_abs_diff(params, checkpoint_params(tmp_path, 5)) > 0


def _largest_file(folder) -> Path:
    return max((p for p in Path(folder).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_corrupted_latest_checkpoint_resumes_from_the_previous_step(reference_run, scale_run_args, compile_cache,
                                                                      tmp_path):
    # Bytes of the newest step's largest array file flipped (same size: only the manifest's CRC32C can tell): the
    # restart names step 20 and the file, sets the step aside, resumes from 15 and ends like the uninterrupted run.
    workdir = tmp_path / "run"
    shutil.copytree(reference_run["workdir"], workdir)
    victim = _largest_file(workdir / "checkpoints" / "20" / "state")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 64])
    victim.write_bytes(bytes(data))
    rel = victim.relative_to(workdir / "checkpoints" / "20")
    p = run_together([train_cmd(workdir, scale_run_args)], [scale_env(DEVICES, compile_cache)], 600,
                     tmp_path / "logs")[0]
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"checkpoint step 20 in {workdir}/checkpoints is damaged: {rel}: CRC32C" in p.stderr, p.stderr[-3000:]
    assert "(corrupted)" in p.stderr
    assert f"resumed from {workdir}/checkpoints at step 15" in p.stderr
    assert list((workdir / "checkpoints_damaged").iterdir())  # set aside, not deleted
    ref_losses = {int(k): v for k, v in reference_run["report"]["losses"].items()}
    losses = logged_losses(workdir)
    assert [losses[s] for s in range(1, STEPS + 1)] == [ref_losses[s] for s in range(1, STEPS + 1)]
    assert max_abs_diff(checkpoint_params(workdir), reference_run["params"]) == 0.0


def test_a_truncated_latest_checkpoint_stops_the_run_when_configured(reference_run, scale_run_args, compile_cache,
                                                                     tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run["workdir"], workdir)
    victim = _largest_file(workdir / "checkpoints" / "20" / "state")
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 3)
    rel = victim.relative_to(workdir / "checkpoints" / "20")
    p = run_together([train_cmd(workdir, scale_run_args, "--config.checkpoint.on_damaged=stop")],
                     [scale_env(DEVICES, compile_cache)], 600, tmp_path / "logs")[0]
    assert p.returncode == 3, p.stderr[-3000:]
    line = next(x for x in p.stderr.splitlines() if x.startswith("mlret.train: "))
    assert line.startswith(f"mlret.train: checkpoint step 20 in {workdir}/checkpoints is damaged: {rel}: "
                           f"{size // 3} bytes, {size} when written (truncated or rewritten); stopping"), line
    assert "traced and compiled" not in p.stderr  # stopped before the first step
    assert complete_steps(workdir) == [5, 10, 15, 20]  # nothing moved or deleted


def test_a_full_disk_fails_clearly_and_keeps_the_last_checkpoint(reference_run, scale_run_args, compile_cache,
                                                                 tmp_path):
    # The run directory on a tmpfs (a private mount namespace of an unprivileged user namespace: no root needed)
    # that holds two checkpoints and a half: the third save fails with a one-line error naming the checkpoint and
    # "No space left on device"; steps 5 and 10 stay complete and loadable, and the partial one is not a step.
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no unprivileged mount namespaces here (unshare -rm)")
    step_bytes = sum(p.stat().st_size for p in (reference_run["workdir"] / "checkpoints" / "5").rglob("*")
                     if p.is_file())
    size_kib = int(step_bytes * 2.5) // 1024 + 256  # + the logs
    mount, kept = tmp_path / "disk", tmp_path / "kept"
    mount.mkdir()
    cmd = " ".join(shlex.quote(c) for c in train_cmd(mount / "run", scale_run_args))
    script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {mount} && {{ {cmd}; echo $? > {tmp_path}/code; }}; "
              f"cp -a {mount}/run {kept}")
    p = run_together([["unshare", "-rm", "sh", "-c", script]], [scale_env(DEVICES, compile_cache)], 600,
                     tmp_path / "logs")[0]
    code = int((tmp_path / "code").read_text())
    assert code == 75, p.stderr[-3000:]
    line = next(x for x in p.stderr.splitlines() if x.startswith("mlret.train: "))
    assert "No space left on device" in line and f"{mount}/run/checkpoints/" in line, line
    steps = complete_steps(kept)
    assert steps[:2] == [5, 10] and len(steps) <= 3, steps
    assert max_abs_diff(checkpoint_params(kept, 10), checkpoint_params(reference_run["workdir"], 10)) == 0.0
    assert checkpoint_params(kept)  # the newest complete step loads; a partial folder is never taken for one


def test_a_full_disk_during_an_export_is_one_line(reference_run, tmp_path):
    # `python -m mlret.export` into a tmpfs that holds half of the model's weights: one line naming the folder and
    # the full disk, exit 75, no traceback (safetensors raises its own error type for the OS error).
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no unprivileged mount namespaces here (unshare -rm)")
    params = checkpoint_params(reference_run["workdir"])
    weight_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params))
    mount = tmp_path / "disk"
    mount.mkdir()
    cmd = [sys.executable, "-m", "mlret.export", "--checkpoint", str(reference_run["workdir"]), "--out",
           str(mount / "export")]
    script = (f"mount -t tmpfs -o size={weight_bytes // 2048}k tmpfs {mount} && "
              f"{{ {shlex.join(cmd)}; echo $? > {tmp_path}/code; }}")
    p = run_together([["unshare", "-rm", "sh", "-c", script]], [scale_env(1)], 300, tmp_path / "logs")[0]
    code = int((tmp_path / "code").read_text())
    assert code == 75, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mlret.export: storage: export {mount}/export failed: no space left on the device"), line
