"""Session fixtures and process helpers for the end-to-end scale tests (multi-host, kill -9, faults, soak).

Runs are the real `mlret.train` loop (tests/scale_worker.py) on a tiny random BERT (tests/model_fixtures.py) and
MLQA-R units, in subprocesses with simulated CPU devices. One uninterrupted 1-process x 4-device run of 20 steps
(`reference_run`) is the yardstick of the multi-process, kill and fault tests; runs share a persistent XLA
compilation cache, so a restarted run does not pay for compiling the same step again.

Imported by tests/conftest.py so that every module shares one instance of each fixture.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.py")
WORKER = str(REPO / "tests" / "scale_worker.py")
STEPS = 20
# Simulated CPU devices of a 1-process scale run (a 2-process run has half of them in each process). 4, not 8: the
# properties need a data-parallel mesh, not its size, and on 2 cores a tiny run on 4 devices takes ~25% less time.
DEVICES = 4
# Float32 noise of a 2-process run against a 1-process one: the gradient all-reduce sums in another order over gloo
# (2 processes) than inside one process. Shared by tests/test_multihost.py and tests/test_gcs.py.
LOSS_RTOL = 2e-6
PARAM_TOL = 1e-6


@dataclass
class Proc:
    returncode: int | None
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def scale_run_args(random_bert_path, shared_data, tmp_path_factory) -> list[str]:
    """Overrides that make configs/smoke.py a tiny, fast run: random 2-layer BERT, batch 8, short texts, 20 steps,
    a checkpoint every 5 steps (all kept), DEVICES simulated devices. The smoke config's learning rate (5e-5) stays."""
    tfds_dir = tmp_path_factory.mktemp("scale_tfds")  # sources prepared once, reused by every run
    return [f"--config.model.name={random_bert_path}", f"--config.data.data_dir={shared_data}",
            f"--config.data.tfds_dir={tfds_dir}", "--config.data.global_batch=8", "--config.data.query_len=16",
            "--config.data.passage_len=32", "--config.optim.learning_rate=5e-5", "--config.optim.warmup_steps=5",
            "--config.train.log_every=1", f"--config.train.steps={STEPS}", "--config.checkpoint.every=5",
            "--config.checkpoint.keep=10", f"--config.mesh.simulated_cpu_devices={DEVICES}"]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache")


def scale_env(devices: int, cache: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update(extra)
    return env


def worker_cmd(workdir: Path, report: Path, args: list[str], *extra: str) -> list[str]:
    return [sys.executable, WORKER, "--report", str(report), "--config", SMOKE, "--workdir", str(workdir), *args,
            *extra]


def train_cmd(workdir: Path, args: list[str], *extra: str, module: str = "mlret.train") -> list[str]:
    """`python -m mlret.train` (or `module`: mlret.testing.train arms the fault hooks) on the smoke config.
    --verbose: these tests read mlret's INFO lines (resume, compilation cache) from the terminal's stderr."""
    return [sys.executable, "-m", module, "--config", SMOKE, "--workdir", str(workdir), "--verbose", *args, *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(cmds: list[list[str]], envs: list[dict[str, str]], timeout: float, log_dir: Path) -> list[Proc]:
    """Start the processes of one run, wait for all; when one fails, kill the others at once (a dead peer leaves
    the rest blocked in a collective for minutes), and kill everything left at `timeout`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for i, (cmd, env) in enumerate(zip(cmds, envs, strict=True)):
        out, err = open(log_dir / f"p{i}.out", "w+"), open(log_dir / f"p{i}.err", "w+")
        files.append((out, err))
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO, text=True))
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                time.sleep(2)  # let the peer print its own error, if it has one
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # by pid: only the processes this helper started
                p.wait(timeout=30)
    results = []
    for p, (out, err) in zip(procs, files):
        out.seek(0), err.seek(0)
        results.append(Proc(p.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def checkpoint_params(workdir: Path, step: int | None = None):
    """The parameters of a run's checkpoint (latest readable step by default), restored in this process on one
    device (mlret.checkpoint.restore_for_export), as a pure dict of numpy arrays."""
    import jax
    from flax import nnx

    from mlret.checkpoint import restore_for_export

    _, model, _ = restore_for_export(workdir, step)
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def logged_losses(workdir: Path) -> dict[int, float]:
    from mlret.metrics_log import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="session")
def reference_run(scale_run_args, compile_cache, tmp_path_factory) -> dict:
    """One uninterrupted 1-process x DEVICES run of 20 steps: its report, workdir and final parameters."""
    base = tmp_path_factory.mktemp("reference")
    workdir, report = base / "run", base / "report.json"
    (p,) = run_together([worker_cmd(workdir, report, scale_run_args)], [scale_env(DEVICES, compile_cache)], 600,
                        base / "logs")
    assert p.returncode == 0, p.stderr[-4000:]
    return {"workdir": workdir, "report": read_report(report), "params": checkpoint_params(workdir)}
