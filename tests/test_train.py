"""`python -m mlret.train` end to end on a tiny random BERT and MLQA-R units, in subprocesses on 4 simulated CPU
devices: exact resume after SIGKILL (its runs load the step from the persistent compilation cache), two processes
equal to one, a checkpoint on SIGTERM, config errors naming the field; and, in process, periodic evaluation
feeding the best checkpoint."""

import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from scale_helpers import max_abs_diff
from scale_runs import free_port, run_together, train_cmd

from mlret.config import apply_overrides, default_config, load_config_file, validate
from mlret.errors import ConfigError
from mlret.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.py"


@pytest.fixture(scope="module")
def tiny_args(random_bert_path, shared_data, tmp_path_factory):
    """Overrides that turn configs/smoke.py into a tiny run (random 2-layer BERT, batch 8, short texts)."""
    tfds_dir = tmp_path_factory.mktemp("tfds")  # sources are prepared once and reused by every run
    return [f"--config.model.name={random_bert_path}", f"--config.data.data_dir={shared_data}",
            f"--config.data.tfds_dir={tfds_dir}", "--config.data.global_batch=8", "--config.data.query_len=16",
            "--config.data.passage_len=32", "--config.optim.learning_rate=1e-3", "--config.optim.warmup_steps=5",
            "--config.train.log_every=1", "--config.mesh.simulated_cpu_devices=4",
            f"--config.train.compilation_cache_dir={tmp_path_factory.mktemp('jax-cache')}"]


def env(**extra):
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache even the tiny model's quick compilations
    e.pop("JAX_COMPILATION_CACHE_DIR", None)  # the config field decides
    e.update(extra)
    return e


def run(cmd, timeout=300, **extra_env):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**extra_env), cwd=REPO)


def final_params(workdir):
    from flax import nnx

    from mlret.checkpoint import restore_for_export

    _, model, _ = restore_for_export(workdir)
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def losses(workdir):
    records = read_metrics(workdir)
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


RUN_A = ["--config.train.steps=40", "--config.checkpoint.every=20"]


@pytest.fixture(scope="module")
def run_a(tiny_args, tmp_path_factory):
    """The uninterrupted 40-step run (one process, 4 devices) the other runs are compared with."""
    workdir = tmp_path_factory.mktemp("run_a")
    a = run(train_cmd(workdir, [*tiny_args, *RUN_A]))
    assert a.returncode == 0, a.stderr[-3000:]
    assert "finished at step 40" in a.stdout
    return workdir, a


def test_exact_resume_after_sigkill(tiny_args, run_a, tmp_path, random_bert_path):
    common = [*tiny_args, *RUN_A]
    workdir_a, a = run_a

    killed = run(train_cmd(tmp_path / "b", common, module="mlret.testing.train"), MLRET_TEST_SIGKILL_AFTER_STEP="25")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["20"]
    assert max(losses(tmp_path / "b")) >= 21  # it ran past the checkpoint before dying
    resumed = run(train_cmd(tmp_path / "b", common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 20" in resumed.stderr
    # run_a compiled the step into config.train.compilation_cache_dir; the same step is loaded, not recompiled.
    assert "train step traced and compiled in" in a.stderr
    for later in (killed, resumed):
        assert "train step traced and compiled in" in later.stderr
        assert "(loaded from the persistent compilation cache)" in later.stderr, later.stderr[-3000:]

    la, lb = losses(workdir_a), losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == list(range(1, 41))  # the interrupted steps 21-25 were dropped, then rerun
    assert [lb[s] for s in range(21, 41)] == [la[s] for s in range(21, 41)]
    pa, pb = final_params(workdir_a), final_params(tmp_path / "b")
    diff = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True))
    assert diff <= 1e-6
    # The comparison is of trained weights (they moved away from the loaded ones), and the logs have every field.
    from flax import nnx

    from mlret.models import load_dual_encoder

    c = default_config()
    c.model.name = str(random_bert_path)
    source = nnx.to_pure_dict(nnx.state(load_dual_encoder(c, query_len=16, passage_len=32)[0], nnx.Param))
    moved = max(float(np.abs(x - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(source),
                                                                         strict=True))
    assert moved > 1e-3
    record = read_metrics(workdir_a)[-1]
    assert {"step", "loss", "batch_type", "learning_rate", "steps_per_sec"} <= set(record)
    assert record["batch_type"] in ("mono", "cross") and record["steps_per_sec"] > 0
    assert list((workdir_a / "tensorboard").glob("events.out.tfevents.*"))
    assert "ETA" in a.stdout and "steps/s" in a.stdout and "mean loss of steps 1-10" in a.stdout


def test_sigterm_saves_a_checkpoint_before_exit(tiny_args, tmp_path):
    proc = subprocess.Popen(train_cmd(tmp_path, tiny_args, "--config.train.steps=100000",
                                      "--config.checkpoint.every=0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (tmp_path / "metrics.jsonl").exists() and len(read_metrics(tmp_path)) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    last = max(losses(tmp_path))
    assert f"preempted at step {last}" in out
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [last]


def test_sigterm_during_a_checkpoint_write_leaves_every_step_loadable(tiny_args, tmp_path):
    """SIGTERM the moment orbax starts writing a checkpoint (its temporary step folder exists): the write in
    flight completes, the preemption save follows, and every step on disk, the last complete one included, loads."""
    from mlret.checkpoint import restore_for_export
    from mlret.testing.soak import complete_steps, partial_steps

    proc = subprocess.Popen(train_cmd(tmp_path, tiny_args, "--config.train.steps=100000",
                                      "--config.checkpoint.every=4", "--config.checkpoint.keep=100"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if complete_steps(tmp_path) and partial_steps(tmp_path):  # a second checkpoint is being written
                break
            time.sleep(0.002)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        writing = partial_steps(tmp_path)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert writing, "the SIGTERM did not land during a checkpoint write"
    assert proc.returncode == 0, err[-3000:]
    last = max(losses(tmp_path))
    assert f"preempted at step {last}" in out
    steps = complete_steps(tmp_path)
    assert steps[-1] == last and len(steps) >= 2 and not partial_steps(tmp_path)
    assert int(writing[0].split(".")[0]) in steps  # the write the signal interrupted finished
    for step in steps:
        restore_for_export(tmp_path, step)  # raises if a step cannot be read


def test_config_errors_name_the_field(tiny_args, tmp_path, random_bert_path):
    bad = run(train_cmd(tmp_path, tiny_args, "--config.data.alpah=0.5"), timeout=120)
    assert bad.returncode == 2
    assert "--config.data.alpah: no such config field (did you mean 'alpha'?)" in bad.stderr

    def config(**fields):
        c = load_config_file(SMOKE)
        c.model.name = str(random_bert_path)
        for k, v in fields.items():
            section, name = k.split("__")
            c[section][name] = v
        return c

    validate(config(), devices=8, processes=1)  # the tiny run's config is fine
    cases = [
        (dict(data__global_batch=12), "config.data.global_batch: 12 is not divisible by the data-parallel size 8"),
        (dict(mesh__data=4, mesh__fsdp=4), r"config.mesh: .* 16 devices, but only 8"),
        (dict(data__alpha=1.5), r"config.data.alpha: 1.5 is outside \[0, 1\]"),
        (dict(data__passage_len=200), r"config.data.passage_len: 200 exceeds the model's 128 positions"),
        (dict(mesh__rules=(("batch", "data"), ("vocab", "model"))), "config.mesh.rules"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(config(**fields), devices=8, processes=1)


def test_periodic_eval_picks_the_best_checkpoint(tiny_args, tmp_path):
    """In process: eval every 2 steps on a slice of XQuAD-R; metrics reach metrics.jsonl and the checkpoints."""
    from mlret.checkpoint import Checkpointer
    from mlret.train import train

    c = load_config_file(SMOKE)
    apply_overrides(c, tiny_args)
    c.mesh.data = 8
    c.train.steps = 6
    c.eval.every = 2
    c.eval.evaluators = "xquad_r"
    c.eval.xquad_r.languages = "en,de"
    c.eval.xquad_r.max_paragraphs = 3
    c.eval.xquad_r.settings = "mono"
    c.eval.plots = False
    c.eval.progress = False
    c.checkpoint.every = 0
    c.checkpoint.keep = 1
    c.checkpoint.best_metric = "xquad_r/mono_mrr"
    c.checkpoint.keep_best = 1
    validate(c, devices=jax.device_count(), processes=1)
    result = train(c, tmp_path)
    assert result.end_step == 6
    evals = {r["step"]: r["xquad_r/mono_mrr"] for r in read_metrics(tmp_path) if "xquad_r/mono_mrr" in r}
    assert sorted(evals) == [2, 4, 6]
    best = max(evals, key=evals.get)
    ck = Checkpointer(tmp_path, c)
    assert ck.steps() == sorted({best, 6})
    assert ck.manager.best_step() == best
    ck.close()


def test_packed_runs_resume_exactly_and_two_processes_equal_one(tiny_args, tmp_path):
    """With config.data.packing (and gradient caching) on: a run killed after step 8 and resumed from its step-6
    checkpoint repeats the uninterrupted run's losses and weights exactly, and two processes x 2 devices (each
    packing its own shards, agreeing on the row counts) train like one process x 4 devices."""
    packed = [*tiny_args, "--config.data.packing=true", "--config.data.packing_rows_multiple=2",
              "--config.train.grad_cache_chunk=4", "--config.train.steps=12", "--config.checkpoint.every=6"]
    whole = run(train_cmd(tmp_path / "whole", packed), timeout=600)  # a compilation per packed shape
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run(train_cmd(tmp_path / "resumed", packed, module="mlret.testing.train"), timeout=600,
                 MLRET_TEST_SIGKILL_AFTER_STEP="8")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run(train_cmd(tmp_path / "resumed", packed), timeout=600)
    assert resumed.returncode == 0 and "at step 6" in resumed.stderr, resumed.stderr[-3000:]
    lw, lr = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted(lw) == sorted(lr) == list(range(1, 13))
    assert [lr[s] for s in range(7, 13)] == [lw[s] for s in range(7, 13)]
    pw, pr = final_params(tmp_path / "whole"), final_params(tmp_path / "resumed")
    assert max_abs_diff(pw, pr) <= 1e-6

    port = free_port()
    procs = run_together(
        [train_cmd(tmp_path / "two", packed, "--config.train.steps=6", "--config.checkpoint.every=0",
                   f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}")
         for i in range(2)],
        [env(XLA_FLAGS="--xla_force_host_platform_device_count=2")] * 2, 400, tmp_path / "logs")
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    two = losses(tmp_path / "two")
    np.testing.assert_allclose([two[s] for s in range(1, 7)], [lw[s] for s in range(1, 7)], rtol=1e-5)


def test_xla_cpu_flags_are_added_and_a_users_own_setting_wins(monkeypatch):
    """mlret.train's XLA:CPU options go into XLA_FLAGS beside what is there (the simulated devices too); a flag the
    user set there already is left as the user set it."""
    from mlret.train import XLA_CPU_FLAGS, set_xla_cpu_flags

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    set_xla_cpu_flags(3)
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_dump_to=/tmp/x" and "--xla_force_host_platform_device_count=3" in flags
    assert all(f in flags for f in XLA_CPU_FLAGS)
    set_xla_cpu_flags(3)  # idempotent: nothing added twice
    assert os.environ["XLA_FLAGS"].split() == flags
    name = XLA_CPU_FLAGS[0].split("=")[0]
    monkeypatch.setenv("XLA_FLAGS", f"{name}=true")
    set_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"] == f"{name}=true"
