"""Faults: kill -9 at random moments (one during a checkpoint write) and restarts end with the uninterrupted run's
parameters and losses, every restart resuming from the newest complete checkpoint; poisoned (NaN) batches are
skipped, counted and logged while training continues, and N in a row stop the run with a clear message and the
last good checkpoint intact. scripts/soak.py runs the 10-kill version (docs/robustness.md)."""

import math

import jax
import numpy as np
from scale_helpers import max_abs_diff
from scale_runs import STEPS, checkpoint_params, logged_losses, run_together, scale_env, train_cmd

from mlret.metrics_log import read_metrics
from mlret.testing.soak import complete_steps, kill_soak


def test_kill9_restarts_end_like_an_uninterrupted_run(reference_run, scale_run_args, compile_cache, tmp_path):
    workdir = tmp_path / "run"
    attempts = kill_soak(train_cmd(workdir, scale_run_args), workdir, kills=2, seed=0,
                         env=scale_env(8, compile_cache), cwd=str(tmp_path), save_delay_s=(0.0, 0.005),
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
                     [scale_env(8, compile_cache)], 600, tmp_path / "logs")[0]
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
