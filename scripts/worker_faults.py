"""Dead-worker campaign: kill -9 one process of a 2-process run at a step, a checkpoint save or an evaluation.

    python scripts/worker_faults.py [--trials 2] [--points step,save,eval] [--peer_timeout_s 20]
        [--write docs/robustness.md]

Two `python -m mlret.train` processes (jax.distributed on 127.0.0.1, gloo, 4 simulated CPU devices each) train a
tiny random BERT on MLQA-R for 20 steps, a checkpoint every 5, an XQuAD-R evaluation (en, de; 4 paragraphs) every
10. One uninterrupted run is the reference. Each trial kills the training process of one of them (alternating
0 and 1) with SIGKILL at its point (mlret.testing.workers.kill_a_worker; the moment chosen by a seeded
generator), times the other's exit from outside (it must be status 76 with one line, within
`peer_timeout_s` + a few seconds), restarts both and checks that the run resumes from its last complete checkpoint
and ends bit-identical to the reference (every step's loss and every final parameter). The table goes to stdout
and, with --write, between the worker_faults markers of a markdown file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from storage_faults import SHARED, tiny_bert  # noqa: E402

from benchmarks._docs import write_section  # noqa: E402
from mlret.supervise import EXIT_PEER  # noqa: E402
from mlret.testing.workers import kill_a_worker  # noqa: E402

STEPS = 20
BEGIN, END = "<!-- worker_faults:begin -->", "<!-- worker_faults:end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(workdir: Path, args: list[str]) -> list[list[str]]:
    port = free_port()
    return [[sys.executable, "-m", "mlret.train", "--config", str(REPO / "configs" / "smoke.py"),
             f"--workdir={workdir}", *args, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"] for i in range(2)]


def run_both(workdir: Path, args: list[str], env: dict[str, str], log_dir: Path, timeout: float = 900) -> list[int]:
    """Both processes to the end; their exit statuses (a process still running at `timeout` is killed: None)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, cmd in enumerate(commands(workdir, [*args, "--verbose"])):
        with open(log_dir / f"p{i}.out", "w") as out, open(log_dir / f"p{i}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO))
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()  # by pid: a process this script started
        p.wait()
    return [p.returncode for p in procs]


def losses(workdir: Path) -> dict[int, float]:
    from mlret.metrics_log import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def params_digest(workdir: Path) -> str:
    import jax
    import numpy as np
    from flax import nnx

    from mlret.checkpoint import restore_for_export

    _, model, _ = restore_for_export(workdir, None)
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]:
        h.update(jax.tree_util.keystr(path).encode() + np.asarray(x).tobytes())
    return h.hexdigest()


def table(rows: list[dict], peer_timeout: int, command: str) -> str:
    out = [f"Dead-worker campaign: 2 processes x 4 simulated CPU devices, `config.runtime.peer_timeout_s="
           f"{peer_timeout}`; the survivor's time is from the SIGKILL to its exit, measured from outside.", "",
           "| point | trials | victim (process) | killed at step / during a save | survivor's exit status | "
           "seconds to exit | restart resumed from | ends bit-identical |", "|---|---|---|---|---|---|---|---|"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["point"], []).append(r)
    for point, rs in by.items():
        secs = [s for r in rs for s in r["survivor_seconds"]]
        out.append(
            f"| {point} | {len(rs)} | {', '.join(str(r['victim']) for r in rs)} | "
            f"{', '.join(str(r['killed_at_step']) + (' (save)' if r['during_save'] else '') for r in rs)} | "
            f"{', '.join(str(c) for r in rs for c in r['survivor_codes'])} | "
            f"{f'{min(secs):.1f}-{max(secs):.1f}' if secs else '-'} | "
            f"{', '.join(str(r['resumed_from']) for r in rs)} | {sum(r['identical'] for r in rs)}/{len(rs)} |")
    line = next((r["survivor_line"] for r in rows if r["survivor_line"]), "")
    out += ["", f"The survivor's line (first trial): `{line[:400]}`", "",
            f"Command: `{command}`; machine: {platform.machine()}, {os.cpu_count()} cores (shared), "
            f"{platform.system()}; date {time.strftime('%Y-%m-%d')}."]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--points", default="step,save,eval")
    ap.add_argument("--peer_timeout_s", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", default="", help="a markdown file whose worker_faults block is replaced")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlret-worker-faults-"))
    model = tiny_bert(tmp / "model")
    args = [f"--config.model.name={model}", f"--config.data.data_dir={SHARED}", f"--config.data.tfds_dir={tmp}/tfds",
            "--config.data.global_batch=8", "--config.data.query_len=16", "--config.data.passage_len=32",
            "--config.optim.warmup_steps=5", "--config.train.log_every=1", f"--config.train.steps={STEPS}",
            "--config.checkpoint.every=5", "--config.checkpoint.keep=10", "--config.eval.every=10",
            "--config.eval.evaluators=xquad_r", "--config.eval.xquad_r.languages=en,de",
            "--config.eval.xquad_r.max_paragraphs=4", "--config.eval.xquad_r.settings=mono",
            "--config.eval.plots=False", "--config.eval.progress=False",
            f"--config.runtime.peer_timeout_s={a.peer_timeout_s}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COMPILATION_CACHE_DIR=str(tmp / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    ref = tmp / "reference"
    codes = run_both(ref, args, env, tmp / "reference-logs")
    assert codes == [0, 0], (codes, (tmp / "reference-logs" / "p0.err").read_text()[-3000:])
    ref_losses, ref_params = losses(ref), params_digest(ref)
    rows = []
    for trial in range(a.trials):
        for k, point in enumerate(a.points.split(",")):
            rng = random.Random(a.seed * 1000 + trial * 10 + k)
            victim = (trial + k) % 2
            at_step = {"step": rng.randint(6, 13), "save": rng.choice((6, 11)), "eval": 10}[point]
            workdir = tmp / f"{point}-{trial}"
            quiet = [[x for x in c if x != "--verbose"] for c in commands(workdir, args)]
            kill = kill_a_worker(quiet, [env, env], workdir, point=point, victim=victim, rng=rng,
                                 log_dir=tmp / f"{point}-{trial}-kill", at_step=at_step)
            row = {"point": point, "trial": trial, "victim": victim, "killed": kill.killed,
                   "killed_at_step": kill.killed_at_step, "during_save": kill.during_save,
                   "survivor_codes": [kill.codes[i] for i in kill.survivors],
                   "survivor_seconds": kill.survivor_seconds,
                   "survivor_line": kill.survivor_lines[0] if kill.survivor_lines else "",
                   "complete_after": kill.complete_after, "bounded": kill.bounded(a.peer_timeout_s + 10)}
            codes = run_both(workdir, args, env, tmp / f"{point}-{trial}-restart")
            err = (tmp / f"{point}-{trial}-restart" / "p0.err").read_text(errors="replace")
            m = re.search(r"resumed from \S+ at step (\d+)", err)
            row["restart_codes"] = codes
            row["resumed_from"] = int(m.group(1)) if m else None
            row["identical"] = (codes == [0, 0] and losses(workdir) == ref_losses
                                and params_digest(workdir) == ref_params)
            print({k: v for k, v in row.items() if k != "survivor_line"}, row["survivor_line"][:300], flush=True)
            row["peer_exit"] = row["survivor_codes"] == [EXIT_PEER]
            rows.append(row)
    command = "python scripts/worker_faults.py " + " ".join(sys.argv[1:])
    text = table(rows, a.peer_timeout_s, command)
    print(text)
    if a.write:
        write_section(BEGIN, END, text, Path(a.write))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
