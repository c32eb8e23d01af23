"""FSDP and tensor sharding of an XLM-R-base-size dual encoder on 8 simulated CPU devices.

    python benchmarks/sharding_memory.py [--layers 12] [--step_layers 2] [--steps 3] [--write docs/robustness.md]

1. Parameter memory per device. The XLM-R-base architecture (hidden 768, 12 layers, 12 heads, MLP 3072, vocabulary
   250,002; random init from a config, no weights needed) is placed with the config's logical-axis rules on the
   meshes (data, fsdp, tensor) = (8,1,1), (1,8,1), (2,2,2), (1,4,2), and the bytes each device holds are summed
   from the arrays' `addressable_shards`. Arrays are placed one at a time and freed, so the replicated layout
   costs 8 copies of the largest array (the 250,002 x 768 word embeddings), not of the whole model.
2. Training steps. The train step (encoder + gathered InfoNCE + AdamW) runs `--steps` steps on the FSDP / tensor
   meshes and on one device, from the same weights and batches, and the losses and parameters are compared. The
   reference is the data-parallel step with one replica: 8 data-parallel replicas of this model with AdamW
   (parameters, two moments and gradients, ~3.3 GB each at 2 layers) do not fit this 24 GiB machine, and
   tests/test_step.py and tests/test_fsdp.py show that the (8,1,1) step equals the one-device step. The step model
   has the base widths and the full vocabulary but `--step_layers` layers (compile time and memory on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mlret import parallel  # noqa: E402
from mlret.config import default_config  # noqa: E402
from mlret.models import DualEncoder, Encoder, EncoderConfig, Tied  # noqa: E402
from mlret.step import build_train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
SECTION = "## FSDP and tensor sharding at XLM-R-base size"
MIB = 2**20


def xlmr_base(layers: int) -> EncoderConfig:
    return EncoderConfig(model_type="xlm-roberta", vocab_size=250002, hidden_size=768, num_layers=layers,
                         num_heads=12, intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                         layer_norm_eps=1e-5, pad_token_id=1)


def config_for(mesh_shape, steps: int):
    c = default_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    c.train.steps = steps
    c.optim.learning_rate, c.optim.warmup_steps = 1e-4, 0
    return c


def param_bytes_per_device(layers: int, mesh_shape) -> tuple[dict, int]:
    """Bytes of parameters on each device for the rules' placement on `mesh_shape` (placed leaf by leaf)."""
    c = config_for(mesh_shape, 1)
    mesh = parallel.make_mesh(c.mesh)
    rules = parallel.parse_rules(c.mesh.rules)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: DualEncoder(Tied(Encoder(xlmr_base(layers), with_pooler=False))))
    _, params = nnx.split(abstract, nnx.Param)
    shardings = jax.tree.leaves(parallel.state_shardings(params, mesh, rules))
    leaves = jax.tree.leaves(nnx.to_pure_dict(params))
    per: dict = {}
    total = 0
    for leaf, sharding in zip(leaves, shardings, strict=True):
        arr = jax.jit(lambda s=leaf.shape: jnp.ones(s, jnp.float32), out_shardings=sharding)()
        for shard in arr.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
        total += arr.nbytes
        del arr
    return per, total


def tiny_batch(seed: int, b: int, g: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = lambda *s: (np.arange(length) < rng.integers(4, length + 1, size=(*s, 1))).astype(np.int32)
    qm, pm = mask(b), mask(b, g)
    # Ids from the whole vocabulary (pad = 1 where masked), so that embedding rows all over the table train.
    ids = lambda m: np.where(m > 0, rng.integers(3, vocab, m.shape), 1).astype(np.int32)
    return {"query_ids": ids(qm), "query_mask": qm, "passage_ids": ids(pm), "passage_mask": pm,
            "unit_id": rng.integers(0, b // 2, b).astype(np.int32)}


def train(mesh_shape, layers: int, steps: int, batches) -> tuple[list[float], dict, float, dict]:
    c = config_for(mesh_shape, steps)
    devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else None
    with nnx.use_eager_sharding(False):
        enc = Encoder(xlmr_base(layers), with_pooler=False, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(enc)
        # A wider init than HF's 0.02, so embeddings differ and the loss is far from its uniform value.
        state = jax.tree.map(lambda x: x * 2.5 if x.ndim == 2 else x, state)
        model = DualEncoder(Tied(nnx.merge(graphdef, state)))
    t, params = build_train_step(model, c, parallel.make_mesh(c.mesh, devices))
    del model, enc, state
    st = t.init_state(params)
    del params
    t0 = time.perf_counter()
    losses = []
    for b in batches:
        st, m = t.step(st, t.global_batch(b))
        losses.append(float(m["loss"]))
    secs = time.perf_counter() - t0
    per: dict = {}
    for arr in jax.tree.leaves(st["params"]):
        for shard in arr.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return losses, jax.device_get(st["params"]), secs, per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="layers of the model whose memory is measured")
    ap.add_argument("--step_layers", type=int, default=2, help="layers of the model that trains (base widths)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--write", default="", help="markdown file to put the results section into")
    args = ap.parse_args()
    assert jax.device_count() == 8, "needs 8 (simulated) devices"

    mem_rows = []
    for mesh_shape in MESHES:
        per, total = param_bytes_per_device(args.layers, mesh_shape)
        values = sorted(set(per.values()))
        split = mesh_shape[1] * mesh_shape[2]
        mem_rows.append((mesh_shape, values, total, split))
        print(f"mesh {mesh_shape}: per-device parameter MiB {[round(v / MIB, 1) for v in values]} of "
              f"{total / MIB:.1f} MiB (1/{total / max(values):.2f}; fsdp x tensor = {split})", flush=True)

    batches = [tiny_batch(s, args.batch, 2, args.length, 250002) for s in range(args.steps)]
    ref_losses, ref_params, ref_secs, _ = train((1, 1, 1), args.step_layers, args.steps, batches)
    print(f"reference (1 device): losses {ref_losses} ({ref_secs:.1f} s)", flush=True)
    step_rows = []
    for mesh_shape in MESHES[1:]:
        losses, params, secs, per = train(mesh_shape, args.step_layers, args.steps, batches)
        dl = max(abs(a - b) for a, b in zip(losses, ref_losses))
        dp = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                 for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True))
        step_rows.append((mesh_shape, losses, dl, dp, max(per.values())))
        print(f"mesh {mesh_shape}: losses {losses}; max |loss - ref| {dl:.2e}; max |param - ref| {dp:.2e} "
              f"({secs:.1f} s); per-device params {max(per.values()) / MIB:.1f} MiB", flush=True)

    if args.write:
        lines = [SECTION, "",
                 f"Parameter bytes per device, XLM-R-base architecture ({args.layers} layers, hidden 768, 12 heads, "
                 "MLP 3072, vocabulary 250,002; float32), 8 simulated CPU devices, the default rules (`embed` -> "
                 "fsdp; `vocab`, `heads`, `mlp` -> tensor), summed from `addressable_shards`:", "",
                 "| mesh (data, fsdp, tensor) | per-device MiB | model MiB | model / per-device | fsdp x tensor |",
                 "|---|---|---|---|---|"]
        for mesh_shape, values, total, split in mem_rows:
            lines.append(f"| {mesh_shape} | {', '.join(f'{v / MIB:.1f}' for v in values)} | {total / MIB:.1f} | "
                         f"{total / max(values):.2f} | {split} |")
        lines += ["", "Only vectors escape the split (LayerNorm and output biases replicated, the other biases split "
                  "over tensor alone), hence slightly less than fsdp x tensor. AdamW's two moments are laid out like "
                  "the parameters (tests/test_fsdp.py checks both on a tiny model).", "",
                  f"Training: {args.steps} AdamW steps (lr 1e-4, no warm-up), base widths and full vocabulary with "
                  f"{args.step_layers} layers, global batch {args.batch} x G=2, length {args.length}, against the "
                  "data-parallel step on one device (see the script's docstring for why not 8 replicas):", "",
                  "| mesh | losses | max abs loss diff | max abs param diff | per-device param MiB |",
                  "|---|---|---|---|---|",
                  f"| (1, 1, 1) reference | {', '.join(f'{x:.5f}' for x in ref_losses)} | - | - | - |"]
        for mesh_shape, losses, dl, dp, pb in step_rows:
            lines.append(f"| {mesh_shape} | {', '.join(f'{x:.5f}' for x in losses)} | {dl:.1e} | {dp:.1e} | "
                         f"{pb / MIB:.1f} |")
        lines += ["", f"Command: `python benchmarks/sharding_memory.py {' '.join(sys.argv[1:])}`; machine: "
                  f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.system()}; jax {jax.__version__};"
                  f" date {datetime.date.today().isoformat()}.", ""]
        path = Path(args.write) if os.path.isabs(args.write) else REPO / args.write
        _replace_section(path, SECTION, "\n".join(lines))
        print(f"wrote {path}")


def _replace_section(path: Path, section: str, text: str) -> None:
    """Put `text` (starting with the `section` heading) into `path`, replacing an older copy of that section."""
    old = path.read_text() if path.exists() else "# mlret: scale and robustness\n"
    if section in old:
        head, rest = old.split(section, 1)
        nxt = rest.find("\n## ")
        old = head.rstrip("\n") + "\n" + (rest[nxt:] if nxt >= 0 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
