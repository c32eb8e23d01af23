"""The largest global batch that fits, found by compiling (mlret.compile --find_max_batch), for a paper model on a
TPU topology, for docs/benchmarks.md.

    python benchmarks/tpu_max_batch.py --model xlmr_base --topology v5e:4x4 --grad_cache_per_device 0 --start 512
    python benchmarks/tpu_max_batch.py --write          # the section from what is measured so far

Each run is one search (`mlret.compile.find_max_batch`: from `--start`, doubling while it fits, then bisecting, in
multiples of the data-parallel size, or of the gradient-cache chunk), each probe one XLA:TPU compilation of the
train step (60-130 s for XLM-R base on v5e-16 on the two shared cores here); its probes and answer are appended to
benchmarks/tpu_max_batch.jsonl. `--start` only saves probes (the search finds the same answer from any start
below it, a few compilations later).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the compile-only TPU devices come from libtpu, not a backend

from benchmarks._docs import cpu_summary, markdown_table, write_section  # noqa: E402
from benchmarks.tpu_compile import MODELS as TABLE_MODELS  # noqa: E402

RESULTS = REPO / "benchmarks" / "tpu_max_batch.jsonl"
START, END = "<!-- tpu_max_batch:start -->", "<!-- tpu_max_batch:end -->"
MODELS = dict(TABLE_MODELS)  # the TPU table's paper models: configs/paper.py argument -> name


def search(args: argparse.Namespace) -> dict:
    from mlret import compile as C

    overrides = [f"data.global_batch={args.start}", f"data.packing={args.packing}"]
    config = C.load_config(str(REPO / "configs" / "paper.py") + f":{args.model},hybrid", overrides)
    t0 = time.perf_counter()
    found = C.find_max_batch(config, args.topology, model_config="builtin", headroom=args.headroom,
                             grad_cache_per_device=args.grad_cache_per_device, limit=args.limit,
                             log=lambda line: print(line, flush=True))
    command = "python benchmarks/tpu_max_batch.py " + shlex.join(sys.argv[1:])
    return dict(found, model=args.model, packing=args.packing, start=args.start, command=command,
                seconds=round(time.perf_counter() - t0, 1), load=os.getloadavg()[0],
                date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M"))


def write(results: list[dict]) -> None:
    rows = []
    for r in results:
        probes = ", ".join(f"{p['global_batch']:,} {'fits' if p['fits'] else 'no'}"
                           + (f" ({p['fraction_of_hbm']:.0%}, {p['compile_seconds']:.0f} s)"
                              if p["fraction_of_hbm"] is not None else " (compiler out of HBM)")
                           for p in r["probes"])
        mem = r["memory"]
        best = f"{r['max_global_batch']:,}" + (" (search limit)" if r["hit_search_limit"] else "")
        rows.append([MODELS[r["model"]], r["topology"], "packed" if r["packing"] else "padded",
                     f"chunk {r['grad_cache_chunk']}" if r["grad_cache_chunk"] else "none", best,
                     f"{mem['total_bytes'] / 2**30:.2f} ({mem['fraction_of_hbm']:.0%})" if mem else "-", probes,
                     f"{r['seconds']:.0f}", f"`{r['command']}`", f"{r['load']:.1f}", r["date"]])
    text = f"""## The largest batch that fits, by compiling (mlret.compile --find_max_batch)

`mlret.compile.find_max_batch` compiles the run's train step for the topology at growing global batches (doubling
from the start while it fits, then bisecting; multiples of the data-parallel size, or of the gradient-cache chunk)
and returns the largest whose compiled per-chip total (arguments + outputs - aliased + temporaries + generated
code) stays within the chip's HBM less a 10% headroom. Settings as in the TPU table above (configs/paper.py,
hybrid, padded, bf16 compute, lengths 64/256, G = 2, no remat; architectures from `--model_config builtin`),
libtpu 0.0.42.1 (jax 0.10.2) on {cpu_summary()}; each row's command, the load average when it ended and its date
(UTC) are in the row. "Probes": every compilation of the search, in order, with its fraction of HBM and compile
time. XLA:TPU's memory is not monotonic in the batch (XLM-R base on v5e-16: 752 pairs take 88.9% of HBM, 736 take
89.2%; 1,024 take 90.9%, barely more than 768's 90.3%; with gradient caching in chunks of 512, 65,536 pairs take
77.5% and 16,384 take 83.0%, and 100,352 and 102,400 are refused by the compiler while 106,496 compiles at 95.7%), so
the answer is the largest fitting batch below the smallest refused probe, not a promise that no larger batch fits.

{markdown_table(["model", "topology", "layout", "gradient caching", "largest batch", "HBM/chip GiB at it",
                 "probes", "search s", "command", "load", "date"], rows)}
"""
    write_section(START, END, text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="xlmr_base", choices=sorted(MODELS))
    p.add_argument("--topology", default="v5e:4x4")
    p.add_argument("--grad_cache_per_device", type=int, default=0, help="0: no gradient caching")
    p.add_argument("--start", type=int, default=100, help="the global batch the search starts from")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--headroom", type=float, default=0.1)
    p.add_argument("--limit", type=int, default=1 << 17, help="stop doubling here")
    p.add_argument("--write", action="store_true", help="only write the docs/benchmarks.md section")
    args = p.parse_args()
    results = list(map(json.loads, RESULTS.read_text().splitlines())) if RESULTS.exists() else []
    if not args.write:
        r = search(args)
        with RESULTS.open("a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        results.append(r)
        print(f"{r['topology']}: largest global batch {r['max_global_batch']} (grad_cache_chunk "
              f"{r['grad_cache_chunk']}), {len(r['probes'])} compilations in {r['seconds']:.0f} s", flush=True)
    write(results)


if __name__ == "__main__":
    main()
