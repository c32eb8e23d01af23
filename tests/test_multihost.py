"""Two processes = one process: 2 jax.distributed processes x 2 simulated devices (127.0.0.1, gloo) train 20 steps
of the real loop to the same parameters as 1 process x 4 devices (scale_runs.DEVICES) on the same data; every
replica of every replicated array is bitwise identical on all 4 devices; the 2-process checkpoint restores in one
process (for export, and to resume training exactly), and a checkpoint whose hosts' data positions differ fails to
resume with a message saying why. A process killed -9 mid-run (a step or a checkpoint save, chosen by a seed) ends
the other with one line and status 76 within its peer timeout, and a restart of both ends bit-identical to the
uninterrupted 2-process run."""

import json
import random
import re
import shutil

import numpy as np
import pytest
from etils import epath
from scale_helpers import max_abs_diff
from scale_runs import (
    DEVICES,
    LOSS_RTOL,
    PARAM_TOL,
    STEPS,
    checkpoint_params,
    free_port,
    logged_losses,
    read_report,
    run_together,
    scale_env,
    train_cmd,
    worker_cmd,
)

from mlret.checkpoint import MANIFEST, Checkpointer, CheckpointLayoutError, config_from_dict, file_digests
from mlret.supervise import EXIT_PEER
from mlret.testing.workers import kill_a_worker


@pytest.fixture(scope="module")
def two_process_run(scale_run_args, compile_cache, tmp_path_factory):
    base = tmp_path_factory.mktemp("two_process")
    workdir = base / "run"
    port = free_port()
    cmds = [worker_cmd(workdir, base / f"report{i}.json", scale_run_args, f"--coordinator_address=127.0.0.1:{port}",
                       "--num_processes=2", f"--process_id={i}") for i in range(2)]
    procs = run_together(cmds, [scale_env(DEVICES // 2, compile_cache)] * 2, 600, base / "logs")
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{p.stderr[-4000:]}"
    return workdir, [read_report(base / f"report{i}.json") for i in range(2)]


def _replicas_identical(reports: list[dict], tree: str) -> int:
    """Check every array of `tree` ('params' or 'opt_state') across the processes' reports: shards holding the
    same index of the global array are bitwise equal. Returns the number of arrays with replicas."""
    with_replicas = 0
    for leaf in reports[0][tree]:
        by_index: dict[str, set[str]] = {}
        devices: dict[str, set[int]] = {}
        for r in reports:
            for index, device, digest in r[tree][leaf]:
                by_index.setdefault(index, set()).add(digest)
                devices.setdefault(index, set()).add(device)
        assert all(len(d) == 1 for d in by_index.values()), f"{tree}{leaf}: replicas differ"
        assert sum(len(d) for d in devices.values()) == DEVICES, f"{tree}{leaf}: not on {DEVICES} devices"
        with_replicas += any(len(d) > 1 for d in devices.values())
    return with_replicas


def _assert_losses_match(losses: dict[int, float], ref: dict[int, float], steps) -> None:
    np.testing.assert_allclose([losses[s] for s in steps], [ref[s] for s in steps], rtol=LOSS_RTOL, atol=0)


def test_two_processes_train_like_one(reference_run, two_process_run):
    workdir, reports = two_process_run
    assert [(r["process_count"], r["device_count"], r["end_step"]) for r in reports] == [(2, DEVICES, STEPS)] * 2
    ref = reference_run["report"]
    losses = {int(k): v for k, v in reports[0]["losses"].items()}
    ref_losses = {int(k): v for k, v in ref["losses"].items()}
    assert sorted(losses) == sorted(ref_losses) == list(range(1, STEPS + 1))
    _assert_losses_match(losses, ref_losses, range(1, STEPS + 1))

    # The checkpoint the two processes wrote together restores here, in one process on one device, and holds the
    # parameters of the one-process run.
    params = checkpoint_params(workdir)
    assert max_abs_diff(params, reference_run["params"]) <= PARAM_TOL
    assert max_abs_diff(params, checkpoint_params(workdir, 5)) > 1e-4  # training moved the weights meanwhile

    # Every replicated array (all of them on this (DEVICES, 1, 1) mesh) is identical on every device of both processes.
    assert _replicas_identical(reports, "params") == len(reports[0]["params"])
    assert _replicas_identical(reports, "opt_state") > 0
    assert _replicas_identical([ref], "params") == len(ref["params"])


def test_two_process_checkpoint_resumes_exactly_in_one_process(reference_run, two_process_run, scale_run_args,
                                                               compile_cache, tmp_path):
    workdir, _ = two_process_run
    for step in (5, 10):  # the 2-process run as it stood at step 10
        shutil.copytree(workdir / "checkpoints" / str(step), tmp_path / "checkpoints" / str(step))
    p = run_together([train_cmd(tmp_path, scale_run_args)], [scale_env(DEVICES, compile_cache)], 600,
                     tmp_path / "logs")[0]
    assert p.returncode == 0, p.stderr[-4000:]
    assert "step 10 was written by 2 processes, restored by 1" in p.stderr and "at step 10" in p.stderr
    losses = logged_losses(tmp_path)
    assert sorted(losses) == list(range(11, STEPS + 1))
    ref_losses = {int(k): v for k, v in reference_run["report"]["losses"].items()}
    _assert_losses_match(losses, ref_losses, range(11, STEPS + 1))
    assert max_abs_diff(checkpoint_params(tmp_path), reference_run["params"]) <= PARAM_TOL


def test_differing_host_data_positions_fail_with_a_reason(two_process_run, tmp_path):
    workdir, _ = two_process_run
    shutil.copytree(workdir / "checkpoints" / "10", tmp_path / "checkpoints" / "10")
    other = tmp_path / "checkpoints" / "10" / "data" / "process_1-of-2.json"
    other.write_text(json.dumps({"next_index": 11}))  # hosts that disagree on where the data stands
    step_dir = epath.Path(tmp_path / "checkpoints" / "10")  # as written, not damaged: its manifest agrees
    (step_dir / MANIFEST).write_text(json.dumps({"step": 10, "files": file_digests(step_dir)}, sort_keys=True))
    saved = json.loads((tmp_path / "checkpoints" / "10" / "config" / "metadata").read_text())
    ck = Checkpointer(tmp_path, config_from_dict(saved))
    try:
        with pytest.raises(CheckpointLayoutError, match="written by 2 processes whose data iterator states differ"
                                                        ".*Resume with 2 processes"):
            ck.restore(None, data_iterator=object())
    finally:
        ck.close()


PEER_TIMEOUT_S = 10  # config.runtime.peer_timeout_s for the kill test (default 60)
KILL_SEED = 29


def test_a_dead_worker_ends_the_other_within_its_bound_and_a_restart_resumes_exactly(
        two_process_run, scale_run_args, compile_cache, tmp_path):
    rng = random.Random(KILL_SEED)
    point, victim = rng.choice(("step", "save")), rng.choice((0, 1))
    workdir = tmp_path / "run"
    env = scale_env(DEVICES // 2, compile_cache)

    def cmds(*extra):
        port = free_port()
        return [train_cmd(workdir, scale_run_args, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={i}", f"--config.runtime.peer_timeout_s={PEER_TIMEOUT_S}", *extra)
                for i in range(2)]

    quiet = [[a for a in c if a != "--verbose"] for c in cmds()]  # the terminal as a user sees it
    kill = kill_a_worker(quiet, [env, env], workdir, point=point, victim=victim, rng=rng, log_dir=tmp_path / "kill")
    (survivor,) = kill.survivors
    err = (tmp_path / "kill" / f"p{survivor}.err").read_text()
    assert kill.killed, f"{point}: the run ended before the kill: {kill}\n{err[-3000:]}"
    # The survivor: status 76, within the peer timeout (+ start-up of the exit), one line and no stack trace.
    assert kill.codes[survivor] == EXIT_PEER, f"{kill}\n{err[-3000:]}"
    assert kill.survivor_seconds[0] <= PEER_TIMEOUT_S + 10, kill
    # jax's report, or (a peer killed between two messages of a CPU collective) gloo's own abort, which can come
    # first: mlret.supervise reads both as a lost peer.
    assert re.match(f"mlret.train: process {survivor} of 2 lost a peer: (jax.distributed|the CPU collectives "
                    r"\(gloo\)) reported '.+'; exiting with status 76", kill.survivor_lines[0]), kill
    assert "Check failure stack trace" not in err and "Terminating process" not in err
    assert kill.complete_after and kill.complete_after[-1] < STEPS, kill

    restart = run_together(cmds(), [env, env], 600, tmp_path / "restart")
    for i, p in enumerate(restart):
        assert p.returncode == 0, f"process {i}: {p.stderr[-3000:]}"
        assert f"at step {kill.complete_after[-1]}" in p.stderr  # resumed from the last complete checkpoint
    ref_workdir, reports = two_process_run
    ref_losses = {int(k): v for k, v in reports[0]["losses"].items()}
    losses = logged_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, STEPS + 1)] == [ref_losses[s] for s in range(1, STEPS + 1)]
    assert max_abs_diff(checkpoint_params(workdir), checkpoint_params(ref_workdir)) == 0


@pytest.mark.parametrize("report", ["gloo", "step"])
def test_the_supervisor_reads_a_gloo_transport_abort_as_a_lost_peer(report):
    """A peer killed between two messages of a CPU collective can make gloo abort the survivor before jax reports
    (seen in CI): `python -m mlret.supervise` turns that abort into exit 76 and one line quoting gloo; an abort
    without such a report keeps its own status (134) and its stderr."""
    import subprocess
    import sys

    lines = ("terminate called after throwing an instance of 'gloo::EnforceNotMet'\n  what():  [enforce fail at "
             "external/gloo/gloo/transport/tcp/pair.cc:459] op.preamble.length <= op.nbytes. 576 vs 12. Received "
             "data size doesn't match expected size.\n") if report == "gloo" else "step 6 loss 1.0\n"
    child = f"import os, sys; sys.stderr.write({lines!r}); sys.stderr.flush(); os.abort()"
    out = subprocess.run([sys.executable, "-m", "mlret.supervise", "--", sys.executable, "-c", child,
                          "--process_id=1", "--num_processes=2"], capture_output=True, text=True, timeout=60)
    if report == "gloo":
        assert out.returncode == 76, out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("mlret.train: process 1 of 2 lost a peer: the CPU collectives (gloo) reported "
                               "'op.preamble.length <= op.nbytes. 576 vs 12."), line
    else:
        assert out.returncode == 134 and "step 6 loss 1.0" in out.stderr, out
