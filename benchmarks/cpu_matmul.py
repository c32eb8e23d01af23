"""Matmul throughput of XLA:CPU by dtype and by XLA_FLAGS (issue 18, item 2: what could close the CPU gap).

    python benchmarks/cpu_matmul.py [--n 2048] [--reps 5] [--write]

For each XLA_FLAGS variant (default; oneDNN for dots; the experimental oneDNN custom call; XNNPACK) a fresh
process (XLA reads its flags once) times the best of `--reps` jitted `jnp.dot(a, b, preferred_element_type=
float32)` of n x n float32 and bfloat16 matrices (bfloat16 inputs, float32 accumulation: what
`config.model.compute_dtype = "bfloat16"` asks of the encoder's matmuls), after one warm-up. On a CPU with
AVX512-BF16 / AMX-BF16 (`lscpu` flags; printed) the bfloat16 rows show what the hardware gives; the float32 rows
are the denominator of the train-step MFU. All variants run in one invocation so that they share the machine's
load, which is printed beside them. `--write` puts the table in docs/benchmarks.md (section "cpu-matmul").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_summary, markdown_table, write_section  # noqa: E402


def section_key(flags: str) -> str:
    """One docs section per kind of CPU (bf16 matmul hardware or not): the machines this project runs on differ
    from session to session, and the answer to "does bfloat16 help" is the hardware's."""
    return "amx-bf16" if "amx_bf16" in flags else "avx512-bf16" if "avx512_bf16" in flags else "no-bf16"


def markers(key: str) -> tuple[str, str]:
    return f"<!-- cpu-matmul:{key}:start -->", f"<!-- cpu-matmul:{key}:end -->"
VARIANTS = ("", "--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true",
            "--xla_cpu_use_xnnpack=true")
_CHILD = """
import json, sys, time, jax, jax.numpy as jnp
n, reps = int(sys.argv[1]), int(sys.argv[2])
out = {}
for dt in ("float32", "bfloat16"):
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    out[dt] = 2 * n ** 3 / best
print(json.dumps(out))
"""


def cpu_flags() -> str:
    """The bf16-relevant ISA flags of this CPU."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    kept = " ".join(f for f in flags if "bf16" in f or f.startswith("amx") or f == "avx512f")
    return kept or "no avx512f, bf16 or amx"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    load_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    for flags in VARIANTS:
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        res = subprocess.run([sys.executable, "-c", _CHILD, str(args.n), str(args.reps)], env=env,
                             capture_output=True, text=True, timeout=600)
        if res.returncode:
            rows.append([f"`{flags or '(default)'}`", "failed", "failed", res.stderr.strip().splitlines()[-1][:80]])
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append([f"`{flags or '(default)'}`", f"{r['float32'] / 1e9:.0f}", f"{r['bfloat16'] / 1e9:.0f}",
                     f"{r['bfloat16'] / r['float32']:.1f}x"])
        print(rows[-1], flush=True)
    load_end = "/".join(f"{x:.1f}" for x in os.getloadavg())
    cmd = "python benchmarks/cpu_matmul.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        f"## XLA:CPU matmul throughput by dtype and XLA_FLAGS ({section_key(cpu_flags())} CPU)\n",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {cpu_summary()} (flags: {cpu_flags()}); load average {load_start} at start, {load_end} at the "
        "end  ",
        f"Date: {datetime.date.today().isoformat()}\n",
        f"Best of {args.reps} jitted {args.n}^3 `jnp.dot(..., preferred_element_type=float32)` per variant, each in "
        "a fresh process.\n",
        markdown_table(["XLA_FLAGS", "float32 GFLOP/s", "bfloat16 GFLOP/s (f32 accumulation)", "bf16 / f32"], rows),
    ])
    print(text)
    if args.write:
        print(f"wrote {write_section(*markers(section_key(cpu_flags())), text)}")


if __name__ == "__main__":
    main()
