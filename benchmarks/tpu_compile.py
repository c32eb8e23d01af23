"""The paper's models compiled for real TPU topologies on this CPU machine (mlret.compile): HBM per chip, fits or
not, FLOPs, collectives and the roofline bound of a step, for docs/benchmarks.md.

    python benchmarks/tpu_compile.py --budget_s 420          # compile the next rows not yet measured, for 7 min
    python benchmarks/tpu_compile.py --write                 # the table from what is measured so far

Rows are measured in priority order (padded first: the paper's batch of both models on every pod, then the gradient-
cached pod batches; then packed) and appended to benchmarks/tpu_compile.jsonl as they finish, so a run under a time
budget resumes where the last stopped; each row is one XLA:TPU compilation (35-200 s on the two shared cores here).
Settings: configs/paper.py (hybrid batches, bf16 compute, lengths 64/256, G = 2, no remat), the architectures from
`--model_config builtin` (no weights here), and:

- the paper's batch of 100 where it divides the data-parallel size (v4-8: 4 chips), else the next multiple of it
  (the step splits the batch evenly over the chips: mlret.parallel.validate_mesh);
- pod batches 1,024 / 4,096 / 16,384, with gradient caching in chunks of 32 pairs per chip where that makes more
  than one chunk, then (lower priority) without.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the compile-only TPU devices come from libtpu, not a backend

from benchmarks._docs import cpu_summary, markdown_table, write_section  # noqa: E402

RESULTS = REPO / "benchmarks" / "tpu_compile.jsonl"
START, END = "<!-- tpu_compile:start -->", "<!-- tpu_compile:end -->"
# (label, topology, slices, chips): v4-8 and v5p-128 count TensorCores, v5e / v6e names count chips.
TOPOLOGIES = [("v4-8", "v4:2x2x1", 1, 4), ("v5e-16", "v5e:4x4", 1, 16), ("v5e-256", "v5e:16x16", 1, 256),
              ("v5p-128", "v5p:4x4x4", 1, 64), ("2 x v6e-16", "v6e:4x4", 2, 32)]
MODELS = [("xlmr_base", "XLM-R base"), ("labse", "LaBSE")]
PER_CHIP_CHUNK = 32


def rows() -> list[dict]:
    """Every row of the table, most important first: padded, then packed; within each, the paper's batch of
    both models on every pod, then each gradient-cached pod batch; last the pod batches without gradient
    caching."""
    out = []
    for tier in (0, 1):
        batches = [("paper", None, False), *((f"{b:,} GC", b, True) for b in (1024, 4096, 16384))]
        if tier:
            batches = [(f"{b:,}", b, False) for b in (1024, 4096, 16384)]
        for packing in (False, True):
            for name, b, gc in batches:
                for model, _ in MODELS:
                    for label, topo, slices, _ in TOPOLOGIES:
                        out.append({"model": model, "pod": label, "topology": topo, "slices": slices,
                                    "batch_label": name, "batch": b, "grad_cache": gc, "packing": packing})
    return out


def key(r: dict) -> tuple:
    return (r["model"], r["topology"], r["slices"], r["batch_label"], r["packing"])


def resolve(row: dict, chips: int) -> tuple[int, int] | None:
    """(global batch, gradient-cache chunk) of a row on `chips` data-parallel chips; None for a gradient-cached
    row whose chunk of 32 pairs per chip would be the whole batch (nothing to cache)."""
    b = row["batch"] if row["batch"] is not None else -(-100 // chips) * chips
    if not row["grad_cache"]:
        return b, 0
    chunk = PER_CHIP_CHUNK * chips
    return (b, chunk) if chunk < b and b % chunk == 0 else None


def measured() -> dict[tuple, dict]:
    if not RESULTS.exists():
        return {}
    return {key(r): r for r in map(json.loads, RESULTS.read_text().splitlines())}


def measure(row: dict, devices_cache: dict) -> dict | None:
    from mlret import compile as C

    tk = (row["topology"], row["slices"])
    if tk not in devices_cache:
        devices_cache[tk] = C.topology_devices(row["topology"], row["slices"])
    settings = resolve(row, len(devices_cache[tk]))
    if settings is None:
        return None
    row = dict(row, global_batch=settings[0], grad_cache_chunk=settings[1])
    overrides = [f"data.global_batch={row['global_batch']}", f"train.grad_cache_chunk={row['grad_cache_chunk']}",
                 f"data.packing={row['packing']}", f"mesh.dcn_data={row['slices']}"]
    config = C.load_config(str(REPO / "configs" / "paper.py") + f":{row['model']},hybrid", overrides)
    t0 = time.perf_counter()
    out = dict(row, load=os.getloadavg()[0], date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M"))
    try:
        r = C.check(config, row["topology"], num_slices=row["slices"], model_config="builtin", eval_step=False,
                    devices=devices_cache[tk])
        r["collectives"].pop("ops")
        out["report"] = r
    except C.DoesNotFit as e:
        out["does_not_fit"] = str(e)
    except C.ConfigError as e:
        out["error"] = str(e)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def table(results: dict[tuple, dict]) -> str:
    header = ["model", "pod (topology)", "batch", "layout", "HBM/chip GiB (args+temp)", "of HBM", "fits",
              "FLOPs/step compiler (formula)", "collectives per step", "loss gather", "step bound ms",
              "pairs/s bound", "MFU at bound", "compile s"]
    lines = []
    for row in rows():
        r = results.get(key(row))
        if r is None:
            continue
        name = dict(MODELS)[row["model"]]
        pod = f"{row['pod']} ({row['topology']}{' x2' if row['slices'] == 2 else ''})"
        layout = "packed" if row["packing"] else "padded"
        batch = f"{r['global_batch']:,}" + (f" GC {r['grad_cache_chunk']}" if r["grad_cache_chunk"] else "")
        if "report" not in r:
            why = "no: compiler out of HBM" if "does_not_fit" in r else f"error: {r['error'][:80]}"
            need = ""
            if "does_not_fit" in r and "needed" in r["does_not_fit"]:
                need = r["does_not_fit"].split("(XLA: ")[1].split(")")[0]
            lines.append([name, pod, batch, layout, need or "-", "-", why, "-", "-", "-", "-", "-", "-", r["seconds"]])
            continue
        rep = r["report"]
        mem, fl, roof = rep["memory"], rep["flops"], rep["roofline"]
        colls = ", ".join(f"{k} {v['count']}x {v['bytes_per_step'] / 2**20:.0f} MiB"
                          for k, v in rep["collectives"]["by_kind"].items())
        lg = rep["loss_gather"]
        if lg["embedding_gathers_per_step"]:
            gather = f"{lg['embedding_gathers_per_step']}x {', '.join(lg['embedding_gather_shapes'])}"
        elif lg["embedding_all_reduce_shapes"]:  # XLA:TPU lowered the gather as an all-reduce (see below)
            gather = f"as all-reduce: {', '.join(lg['embedding_all_reduce_shapes'])}"
        else:  # no collective of an embedding's shape: the classifier did not recognise the lowered form
            gather = "not identified in the HLO"
        if lg["other_gathers_per_step"]:
            gather += f"; other: {lg['other_gathers_per_step']}"
        flops = (f"{fl['compiler_total']:.2e}" + ("*" if fl.get("loops_counted_once") else "")
                 + f" ({fl['formula_total']:.2e})")
        lines.append([name, pod, batch, layout,
                      f"{_gib(mem['total_bytes'])} ({_gib(mem['argument_bytes'])}+{_gib(mem['temp_bytes'])})",
                      f"{mem['fraction_of_hbm']:.0%}", "yes" if mem["fits"] else "no (headroom)", flops, colls,
                      gather, f"{roof['step_seconds_lower_bound'] * 1e3:.1f}",
                      f"{roof['examples_per_second_upper_bound']:,.0f}", f"{roof['mfu_at_bound']:.0%}",
                      rep["compile_seconds"]])
    return markdown_table(header, lines)


def write(results: dict[tuple, dict]) -> None:
    chips = {t: c for _, t, _, c in TOPOLOGIES}
    planned = [r for r in rows() if resolve(r, chips[r["topology"]]) is not None]
    total, done = len(planned), sum(key(r) in results for r in planned)
    core = [r for r in planned if r["batch"] is None or r["grad_cache"]]  # the paper's batch and the GC pod batches
    core_done = sum(key(r) in results for r in core)
    loads = [r["load"] for r in results.values()]
    dates = sorted(r["date"] for r in results.values())
    text = f"""## TPU ahead-of-time compilation: the paper's models on real topologies (mlret.compile)

Command: `python benchmarks/tpu_compile.py --budget_s 420` (repeated; rows resume from
benchmarks/tpu_compile.jsonl), then `python benchmarks/tpu_compile.py --write`. Each row is
`python -m mlret.compile --config configs/paper.py:MODEL,hybrid --model_config builtin --topology T [--num_slices 2]
--no_eval --config.data.global_batch=B --config.train.grad_cache_chunk=C --config.data.packing=P`, compiled by
libtpu 0.0.42.1 (jax 0.10.2) on {cpu_summary()}, load average {min(loads):.1f}-{max(loads):.1f} (other sessions
share the two cores), {dates[0]} to {dates[-1]} UTC. {done} of {total} planned rows measured:
{core_done} of the {len(core)} rows of the paper's batch and the gradient-cached pod batches (both layouts),
{done - core_done} of the {total - len(core)} pod batches without gradient caching (the rest were not reached in
the sessions' time: see the list below the table).

Settings: configs/paper.py (bf16 compute, float32 weights and AdamW state, lengths 64/256, G = 2, no remat,
`loss.gather=constraint`, pure data parallelism), architectures from the hub config.json files
(`mlret.compile.BUILTIN_MODEL_CONFIGS`: no weights here). "paper" is the paper's batch of 100 where it divides
the chips (v4-8), else the next multiple of the chip count (the step splits the batch evenly). "GC C": gradient
caching in chunks of C pairs (32 per chip). Packed rows assume texts fill half their static length
(`--pack_fill 0.5`). HBM per chip: the compiler's argument + output - aliased + temporary + generated-code bytes;
"fits": within the chip's HBM less 10% headroom (`--headroom`); "compiler out of HBM": XLA:TPU refused to compile
(the bytes it needed beside). FLOPs: the compiler's count (all chips) beside mlret/flops.py's matmul count;
\\* marks gradient-caching rows, where XLA's cost analysis counts each scan body once (so it reads about 1/k of the
encoder's work for k chunks; the bound then uses the formula x 4/3). Collectives: per step, by kind, with the
bytes each chip receives; "loss gather": the all-gathers of embeddings (shape per chip after the gather).

The step bound is max(FLOPs per chip / peak bf16 FLOP/s, HBM bytes accessed per chip / HBM bandwidth) with the
chip figures of `mlret.compile.CHIPS` (Cloud TPU docs). It leaves out: collective time on ICI and DCN (the
gradient all-reduce of 1-2 GiB of float32 gradients per step is the largest: about 1.1 GiB for XLM-R base over
v5e's 400 GB/s bidirectional ICI is ~5 ms at best, and across slices it goes over the data-center network),
imperfect overlap of communication with compute, the host input pipeline, kernel launch gaps, and the compiler's
scheduling quality; the peak FLOP/s is a data-sheet number that matmuls reach only at large tiles. A real step
takes longer; the MFU at the bound is therefore an upper bound on the MFU a run can reach.

{table(results)}

What the compiler did that the design did not say (read from the compiled HLO of the rows above):

- With one or two pairs per chip (v5e-256, v5p-128 at the paper's batch) XLA:TPU lowers the loss's all-gather of
  the passage embeddings as an all-reduce of the whole [B x G, D] array (each chip contributing its rows, zeros
  elsewhere); the table's "loss gather" column says "as all-reduce". With more rows per chip it stays an
  all-gather (bf16, the TPU's default matmul precision feeding the score matmul).
- Across two slices (2 x v6e-16) the float32 gradient all-reduce becomes a reduce-scatter within each slice and
  the optimizer update runs sharded: the updated weights come back as all-gathers of their bf16 copies
  (the 224 "other" gathers, among them the 250,002 x 768 word embeddings), and the loss's gather stays float32.
  This is XLA's own weight-update sharding, not mesh.fsdp; it moves about as many bytes as one all-reduce.
- Packing pays from a few pairs per chip on: with gradient caching the packed step's bound is 0.5-0.7 of the
  padded one (texts fill half their length here) and its HBM lower: 12-28% for XLM-R base, 5-21% for LaBSE
  (except on v5e, below). At one or two pairs per chip (the paper's batch on v5e-256 and v5p-128) it costs
  instead: each shard's packed rows are rounded up to `data.packing_rows_multiple` (4), so one pair per chip
  encodes 4 query and 4 passage rows where padding encodes 1 and 2 (XLM-R base on v5e-256: 37.0 against 27.1 ms,
  6.58 against 5.24 GiB). At that scale set the multiple to 1 or leave packing off.
- LaBSE with gradient caching on v5e-16 takes 16.33-16.37 GiB per chip in all six rows (1,024, 4,096 and 16,384
  pairs, padded and packed), about 102% of v5e's 15.75 GiB, though XLA:TPU compiled each (elsewhere it refuses
  outright): the total follows neither the batch nor the layout, where XLM-R base's drops 12-28% with packing. On
  v5e-256 it is 16.33 GiB padded and 17.34 GiB packed. So on v5e LaBSE does not fit at any of these batches; what
  to change is `train.grad_cache_chunk`, `model.remat` or `mesh.fsdp` (its 5.3 GiB of replicated float32 weights
  and AdamW state), not the batch.
"""
    missing = [r for r in planned if key(r) not in results]
    if missing:
        text += "\nNot measured yet: " + "; ".join(
            f"{dict(MODELS)[r['model']]} {r['pod']} {r['batch_label']} {'packed' if r['packing'] else 'padded'}"
            for r in missing) + ".\n"
    gpu = sorted(REPO.glob("benchmarks/gpu_compile_*.json"))
    if gpu:
        text += GPU_TEXT + "\n" + markdown_table(
            ["GPUs", "batch", "HBM/GPU GiB (args+temp)", "of HBM", "FLOPs/step (formula)", "collectives per step",
             "loss gather", "step bound ms (compute)", "pairs/s bound", "compile s"],
            [gpu_row(json.loads(f.read_text())) for f in gpu]) + "\n"
    else:
        text += GPU_PENDING
    write_section(START, END, text)


GPU_TEXT = """
**GPU, without a GPU.** jax's deviceless GPU compile works here: the CUDA plugin wheels alone
(`pip install --no-deps jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2`, no CUDA libraries, no GPU) and a
`GpuTargetConfigProto` text give compile-only CUDA devices, and XLA:GPU compiles the real step for them. No GPU was
lent to read the target config from one, so benchmarks/gpu_specs/h100_sxm.txtpb is XLA's own H100 SXM spec file
(`xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb`; it has no cuDNN version); benchmarks/gpu_check.sh reads the real
one (`gpu_target_config.txtpb` in its output) the first time a GPU is lent. Command:
`python -m mlret.compile --config configs/paper.py:xlmr_base,hybrid --model_config builtin --topology gpu:1x1xN
--gpu_target_config benchmarks/gpu_specs/h100_sxm.txtpb --no_eval --config.data.global_batch=B` (B = 100; 104 on 8,
the next multiple of 8). XLA:GPU reports no generated-code bytes, and its temporaries are its buffer assignment
without the runtime's cuBLAS / cuDNN workspaces. Its compile-only executables have no cost analysis (no FLOP or
HBM-traffic count), so the FLOPs are mlret/flops.py's and the bound is the compute time alone at 989 TFLOP/s bf16
dense: a weaker bound than the TPU rows' (which also count HBM traffic), and an MFU "at the bound" of 100% by
construction, hence not shown. On 8 GPUs the loss's gather moves the passage embeddings in float32 laid out
[D, B x G] (XLA:GPU keeps float32 where XLA:TPU gathers bf16), and its backward is a reduce-scatter (an all-reduce
on TPU).
"""


GPU_PENDING = """
**GPU, without a GPU.** jax's deviceless GPU compile works on this machine: with the CUDA plugin wheels alone
(`pip install --no-deps jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2`: no CUDA libraries, no GPU),
`JAX_PLATFORMS=cpu` and a `GpuTargetConfigProto` text, `jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=..., topology="1x1x8")` gives 8 compile-only "NVIDIA H100 80GB HBM3" devices and XLA:GPU compiles
a sharded toy program for them (0.1-0.2 s; its sum became an all-reduce over the 8). Without `JAX_PLATFORMS=cpu` the
plugin tries to start for real, fails to load cuDNN, and then answers "topology not implemented for cuda".
No GPU was lent, so the target config is XLA's own H100 SXM spec file (`xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb`,
in benchmarks/gpu_specs/; it carries no cuDNN version), not one read from a GPU. `python -m mlret.compile
--topology gpu:1x1x8 --gpu_target_config benchmarks/gpu_specs/h100_sxm.txtpb` runs the train step through it; its
rows were not measured in this session (the shared cores' queue), so there is no GPU row yet.
"""


def gpu_row(r: dict) -> list:
    mem, fl, roof, lg = r["memory"], r["flops"], r["roofline"], r["loss_gather"]
    colls = ", ".join(f"{k} {v['count']}x {v['bytes_per_step'] / 2**20:.1f} MiB"
                      for k, v in r["collectives"]["by_kind"].items()) or "none"
    gather = (f"{lg['embedding_gathers_per_step']}x {', '.join(lg['embedding_gather_shapes'])}"
              if lg["embedding_gathers_per_step"] else "none (one GPU)" if r["chips"] == 1 else "none")
    return [f"{r['chips']} x {r['chip']['name']}", r["settings"]["global_batch"],
            f"{_gib(mem['total_bytes'])} ({_gib(mem['argument_bytes'])}+{_gib(mem['temp_bytes'])})",
            f"{mem['fraction_of_hbm']:.0%}", f"{fl['formula_total']:.2e}", colls, gather,
            f"{roof['step_seconds_lower_bound'] * 1e3:.1f}", f"{roof['examples_per_second_upper_bound']:,.0f}",
            r["compile_seconds"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget_s", type=float, default=0, help="measure rows for this many seconds (one at least)")
    p.add_argument("--only", default="", help="measure only rows whose pod label contains this")
    p.add_argument("--write", action="store_true", help="write the docs/benchmarks.md section")
    args = p.parse_args()
    done = measured()
    t0, devices, n = time.perf_counter(), {}, 0
    for row in rows():
        if (n or not args.budget_s) and time.perf_counter() - t0 >= args.budget_s:  # a budget: one row at least
            break
        if key(row) in done or (args.only and args.only not in row["pod"]):
            continue
        r = measure(row, devices)
        if r is None:  # nothing to cache at this batch on this pod: not a row
            continue
        n += 1
        with RESULTS.open("a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        done[key(row)] = r
        status = ("fits" if r["report"]["memory"]["fits"] else "over headroom") if "report" in r else (
            "does not fit" if "does_not_fit" in r else "error: " + r["error"][:200])
        print(f"{row['model']} {row['pod']} {row['batch_label']} packing={row['packing']}: {status} "
              f"({r['seconds']} s)", flush=True)
    if args.write:
        write(done)


if __name__ == "__main__":
    main()
