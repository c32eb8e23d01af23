"""What a restart costs before the first step: compiling the train step, with and without jax's persistent
compilation cache (`config.train.compilation_cache_dir`).

    python benchmarks/restart_compile.py [--config configs/smoke.py] [--steps 2] [--write] [-- --config.k=v ...]

Runs `python -m mlret.train` three times with the same config (`--steps` x 2 steps, a checkpoint every
`--steps`), each in a fresh process, with a cache directory that starts empty:

1. a run with the cache off (`compilation_cache_dir=""`): what every start and every resume cost before;
2. a run in a new workdir with the cache on and empty, killed with SIGKILL after its checkpoint at step
   `--steps` (a preemption; `python -m mlret.testing.train`, mlret.train with the test hook
   MLRET_TEST_SIGKILL_AFTER_STEP): it compiles and fills the
   cache;
3. the restart of run 2 with the identical command: it resumes from the checkpoint and loads the step from the
   cache.

For each it reads the loop's log line "train step traced and compiled in X s" and the process's wall time, and
prints a table; `--write` puts it in docs/benchmarks.md (section "Restart"), with the command, machine and date.
Arguments after `--` go to every run (e.g. `--config.mesh.simulated_cpu_devices=0`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_summary, markdown_table, write_section  # noqa: E402

START, END = "<!-- restart-compile:start -->", "<!-- restart-compile:end -->"
LINE = re.compile(r"train step traced and compiled in ([0-9.]+) s( \(loaded from the persistent compilation cache\))?")


def run(config: str, workdir: Path, steps: int, cache: str, extra: list[str],
        kill_after: int = 0) -> tuple[float, float, bool]:
    """(compile seconds from the log, process wall seconds, loaded from the cache?) of one training process."""
    module = "mlret.testing.train" if kill_after else "mlret.train"  # the testing CLI reads the kill switch
    cmd = [sys.executable, "-m", module, "--config", config, "--workdir", str(workdir),
           f"--config.train.steps={2 * steps}", f"--config.checkpoint.every={steps}",
           f"--config.optim.warmup_steps={steps}",
           f"--config.train.compilation_cache_dir={cache}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the config field decides
    if kill_after:
        env["MLRET_TEST_SIGKILL_AFTER_STEP"] = str(kill_after)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != (-9 if kill_after else 0):
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    m = LINE.search(p.stderr)
    if m is None:
        sys.exit(f"no compile time in the log of {' '.join(cmd)}:\n{p.stderr[-3000:]}")
    return float(m.group(1)), wall, m.group(2) is not None


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/smoke.py")
    p.add_argument("--steps", type=int, default=2, help="checkpoint interval; every run trains to twice this")
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="mlret-restart-") as tmp:
        tmp = Path(tmp)
        cache = str(tmp / "cache")
        cases = [("run, cache off (before)", tmp / "off", "", 0),
                 (f"run, empty cache, killed after step {args.steps}", tmp / "on", cache, args.steps),
                 (f"restart of that run: resume from step {args.steps}, warm cache (after)", tmp / "on", cache, 0)]
        for name, workdir, cache_dir, kill_after in cases:
            compile_s, wall, hit = run(args.config, workdir, args.steps, cache_dir, extra, kill_after)
            rows.append([name, f"{compile_s:.1f}", "yes" if hit else "no", f"{wall:.1f}"])
            print(rows[-1], flush=True)
        size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file()) / 2**20

    command = "python benchmarks/restart_compile.py " + " ".join(argv)
    text = "\n".join([
        "## Restart: compiling the train step, with and without the persistent compilation cache\n",
        f"Command: `{command}`  \nMachine: {cpu_summary()}, load average {os.getloadavg()[0]:.1f} at the end  \n"
        f"Date: {datetime.date.today().isoformat()}\n",
        f"`{args.config}`, each row a fresh `python -m mlret.train` process. \"compile s\" is the first step's "
        "dispatch as the loop logs it (trace + compile, or trace + load from the cache); \"process s\" is the "
        f"whole process (imports, model, data, checkpoints, the steps, exit; the rows train {2 * args.steps}, "
        f"{args.steps} and {args.steps} steps). The cache held "
        f"{size:.1f} MiB afterwards.\n",
        markdown_table(["run", "compile s", "loaded from cache", "process s"], rows),
        "",
    ])
    print(text)
    if args.write:
        print(f"wrote {write_section(START, END, text)}")


if __name__ == "__main__":
    main()
