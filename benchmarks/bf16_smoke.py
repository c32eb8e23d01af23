"""The smoke run in float32 and in bfloat16 compute: loss curves side by side, for docs/robustness.md.

    python benchmarks/bf16_smoke.py --workdir /tmp/bf16_smoke [--steps 100] [--write docs/robustness.md]

Runs `python -m mlret.train --config configs/smoke.py` (the real all-MiniLM-L6-v2 weights, MLQA-R units, hybrid
alpha = 0.5, 8 simulated CPU devices) twice from the same weights on the same batches, once with
`config.model.compute_dtype=float32` and once with `bfloat16` (parameters, AdamW state and the loss stay float32),
logging every step, and compares the curves (a finished run left in --workdir by an earlier call is reused). Stated
tolerance (the same as tests/test_bf16.py's): every step's loss
within 2% (relative) of float32's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTION = "## bf16 compute: the smoke run against float32"
REL_TOL = 0.02


def run(dtype: str, workdir: Path, steps: int) -> tuple[dict[int, float], float]:
    from mlret.metrics_log import read_metrics

    done = [r for r in read_metrics(workdir) if "loss" in r] if (workdir / "metrics.jsonl").exists() else []
    if sorted(r["step"] for r in done) == list(range(1, steps + 1)):  # a finished run of this script: reuse it
        return {r["step"]: float(r["loss"]) for r in done}, float(np.median([r["steps_per_sec"] for r in done[5:]]))
    shutil.rmtree(workdir, ignore_errors=True)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "mlret.train", "--config", str(REPO / "configs" / "smoke.py"), "--workdir",
           str(workdir), f"--config.model.compute_dtype={dtype}", "--config.train.log_every=1",
           f"--config.train.steps={steps}", f"--config.data.tfds_dir={workdir.parent / 'tfds'}"]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{dtype} run failed:\n{p.stderr[-3000:]}")
    records = [r for r in read_metrics(workdir) if "loss" in r]
    rates = [r["steps_per_sec"] for r in records[5:]]  # past compilation
    return {r["step"]: float(r["loss"]) for r in records}, float(np.median(rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--write", default="")
    args = ap.parse_args()
    base = Path(args.workdir)
    curves, rates = {}, {}
    for dtype in ("float32", "bfloat16"):
        curves[dtype], rates[dtype] = run(dtype, base / dtype, args.steps)
        print(f"{dtype}: {len(curves[dtype])} steps, median {rates[dtype]:.2f} steps/s", flush=True)
    steps = sorted(curves["float32"])
    f32 = np.array([curves["float32"][s] for s in steps])
    bf16 = np.array([curves["bfloat16"][s] for s in steps])
    rel = np.abs(bf16 - f32) / np.abs(f32)
    ok = bool(rel.max() <= REL_TOL) and sorted(curves["bfloat16"]) == steps
    first, last = slice(0, 10), slice(-10, None)
    summary = (f"max relative difference {rel.max():.4f} (step {steps[int(rel.argmax())]}), mean {rel.mean():.4f}; "
               f"mean loss of the first 10 steps {f32[first].mean():.4f} (float32) / {bf16[first].mean():.4f} "
               f"(bf16), of the last 10 {f32[last].mean():.4f} / {bf16[last].mean():.4f}")
    print(summary, "PASS" if ok else "FAIL")
    if args.write:
        every = max(len(steps) // 10, 1)
        rows = "\n".join(f"| {s} | {f:.4f} | {b:.4f} | {100 * r:.2f}% |"
                         for s, f, b, r in zip(steps[::every], f32[::every], bf16[::every], rel[::every]))
        text = (f"{SECTION}\n\n`python -m mlret.train --config configs/smoke.py` ({args.steps} steps, real MiniLM "
                "weights, MLQA-R units, alpha 0.5, 8 simulated CPU devices) with `model.compute_dtype` float32 and "
                "bfloat16 (parameters, AdamW moments and the loss in float32 either way), the same weights and "
                f"batches. Tolerance: every step's loss within {100 * REL_TOL:.0f}% of float32's.\n\n"
                f"Result: **{'PASS' if ok else 'FAIL'}**: {summary}. Median speed {rates['float32']:.2f} (float32) "
                f"and {rates['bfloat16']:.2f} (bf16) steps/s (CPU; not a speed comparison on a shared machine).\n\n"
                "| step | float32 loss | bf16 loss | relative difference |\n|---|---|---|---|\n"
                f"{rows}\n\nCommand: `python benchmarks/bf16_smoke.py {' '.join(sys.argv[1:])}`; machine: "
                f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.system()}; date "
                f"{datetime.date.today().isoformat()}.\n")
        path = Path(args.write) if os.path.isabs(args.write) else REPO / args.write
        sys.path.insert(0, str(REPO / "scripts"))
        from soak import _replace_section

        _replace_section(path, text)
        print(f"wrote {path}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
