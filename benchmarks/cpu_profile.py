"""Where XLA's CPU time goes in the mlret train step: a jax profiler trace, summed per kind of XLA operation.

    python benchmarks/cpu_profile.py [--batch 64 --query-len 64 --passage-len 192 --group-size 2]
        [--dtype float32|bfloat16] [--packing] [--steps 2] [--write]

MiniLM (real weights), the first MLQA-R hybrid batch of the Grain pipeline, the full step (encoder, InfoNCE,
AdamW), compiled once and run once untraced; then `--steps` steps under `jax.profiler.trace(...,
create_perfetto_trace=True)` with `--xla_cpu_enable_xprof_traceme=true`, so that every thunk the XLA CPU runtime
executes is an event of the trace. The events are summed by operation name with its numeric suffix dropped
(`fusion.123` -> `fusion`): `ynn_fusion` / `dot` are the matrix multiplications (YNNPACK / Eigen), `fusion` and
`loop_fusion` the fused elementwise work (LayerNorm, GELU, softmax, masks, AdamW), `copy` / `transpose` layout
changes, `reduce` reductions. The share is of the summed thunk time (threads overlap, so it is CPU time, not wall
time). `--write` puts the table in docs/benchmarks.md (section "cpu-profile").
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_summary, markdown_table, write_section  # noqa: E402
from benchmarks.train_step import load, make_config, model_folder  # noqa: E402

START, END = "<!-- cpu-profile:start -->", "<!-- cpu-profile:end -->"
# Events of the runtime around the program (Python, PjRt, the executor's own bookkeeping), not XLA operations.
_NOT_OPS = re.compile(r"^(\$|PjitFunction|CommonPjRt|Pjrt|PjRt|ThunkExecutor|ThreadpoolListener|Allocate|Handle |"
                      r"Parse|Wait |PythonRefManager|end: |TfrtCpu|Execute|Await)")


def op_kind(name: str) -> str:
    """`fusion.12` -> `fusion`; `%dot.3` -> `dot`."""
    return re.sub(r"[.\d]+$", "", name.lstrip("%"))


def thunk_times(trace_dir: str) -> collections.Counter:
    """Microseconds per operation kind in the perfetto trace under `trace_dir`."""
    path = glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True)[0]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    out: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not _NOT_OPS.match(e["name"]):
            out[op_kind(e["name"])] += float(e.get("dur", 0.0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--query-len", type=int, default=64)
    p.add_argument("--passage-len", type=int, default=192)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("MLRET_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    args.remat, args.synthetic = False, False
    import jax

    from mlret import parallel
    from mlret.data import make_train_iterator
    from mlret.models import load_dual_encoder
    from mlret.step import build_train_step

    load_start = load()
    tmp = Path(tempfile.mkdtemp(prefix="mlret-cpu-profile-"))
    c = make_config(args, model_folder("minilm", Path(args.data_dir), tmp), args.batch, tmp)
    c.data.packing = args.packing
    model, tok = load_dual_encoder(c)
    trainer, params = build_train_step(model, c, parallel.make_mesh(c.mesh))
    state = trainer.init_state(params)
    it = make_train_iterator(c, tok, process_index=0, process_count=1)
    batch = trainer.global_batch(next(it))
    step = trainer.step.lower(state, batch).compile()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    with jax.profiler.trace(str(tmp / "trace"), create_perfetto_trace=True):
        for _ in range(args.steps):
            state, m = step(state, batch)
            jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / args.steps
    times = thunk_times(str(tmp / "trace"))
    total = sum(times.values())
    rows = [[k, f"{v / 1e3 / args.steps:.0f}", f"{v / total:.1%}"] for k, v in times.most_common(12)]
    cmd = "python benchmarks/cpu_profile.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "## Where the CPU step's time goes (jax profiler trace, per XLA operation kind)\n",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {cpu_summary()}, jax {jax.__version__}; load average {load_start} at start, {load()} at the end  ",
        f"Date: {datetime.date.today().isoformat()}\n",
        f"all-MiniLM-L6-v2, batch {args.batch}, G = {args.group_size}, lengths {args.query_len}/{args.passage_len}, "
        f"{args.dtype}, packing {'on' if args.packing else 'off'}; {args.steps} traced steps, {wall:.2f} s wall each; "
        f"thunk CPU time summed over threads {total / 1e6 / args.steps:.2f} s per step.\n",
        markdown_table(["XLA operation kind", "CPU ms / step", "share"], rows),
    ])
    print(text)
    if args.write:
        print(f"wrote {write_section(START, END, text)}")


if __name__ == "__main__":
    main()
