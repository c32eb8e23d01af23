"""Compile mlret's train step and evaluation encoder for a TPU topology ahead of time, on any machine.

    python -m mlret.compile --config configs/paper.py:xlmr_base,hybrid --topology v5e:16x16 \\
        [--num_slices 2] [--model_config PATH|builtin] [--out report.json] [--find_max_batch] [--config.k=v ...]

With libtpu installed (`pip install -e ".[tpu]"`), `jax.experimental.topologies` gives compile-only devices of a
TPU topology (`v4:2x2x1`, `v5e:4x4`, `v5p:4x4x4`, `v6e:16x16`; several slices with `--num_slices`) and the real
XLA:TPU compiler runs on this machine's CPU (MaxText's `train_compile.py` does the same). Nothing is placed on a
device and no weights are read: the model is built from its `config.json` alone (or `--model_config`), under
`jax.eval_shape`, and goes through the same `mlret.step.build_train_step` and `mlret.parallel.make_mesh` a run uses,
so the step compiled here is the one `mlret.train` would run for that config: its loss gather, gradient caching,
remat, packing and compute dtype, over the hybrid DCN mesh when there are several slices. The passage encoder of
evaluation (`mlret.eval.encode`) is compiled too.

The report, printed and (`--out`) written as JSON, gives per chip: argument, output, temporary and generated-code
bytes and their total against the chip's HBM (`CHIPS`), the FLOPs of a step by the compiler beside
`mlret.flops`' formula, the collectives of the compiled HLO by kind with their bytes (the gathered loss shows as an
all-gather of the passage embeddings), and a roofline lower bound of the step time with the MFU it implies.
`--find_max_batch` finds the largest global batch that fits in HBM with `--headroom` to spare, by compiling,
without and with gradient caching. A config that does not fit, or that the compiler rejects, fails with one line
naming the config fields to change.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub

from mlret.data.packing import round_up
from mlret.errors import ConfigError, GradCacheError

# jax, and every module that imports it (mlret.config, .parallel, .models, .step, .flops, .eval.encode), is imported
# inside the functions that use it ("# lazy: jax after JAX_PLATFORMS"): `main` sets JAX_PLATFORMS=cpu before jax
# starts (the CUDA plugin otherwise refuses a deviceless topology), and --help and the one-line errors of a config
# that does not load come before it.

PROG = "mlret.compile"


# --------------------------------------------------------------------------------------------------------------
# Chips. Per chip, from the Cloud TPU system-architecture pages (checked 2026-12-06):
#   v4   https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, HBM2 32 GiB, 1,200 GB/s
#   v5e  https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, HBM2 16 GiB, 819 GB/s
#   v5p  https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, HBM2e 95 GB, 2,765 GB/s
#   v6e  https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, HBM 32 GB, 1,638 GB/s (Trillium)
# Where the page says GB, the decimal value is taken (the smaller one): the verdict errs on the side of "does
# not fit". jax sees one device per chip on all four (v4 runs its two TensorCores as one megacore device).


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # per second
    hbm_bytes_per_s: float
    source: str


GiB = 1024**3
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * 10**9, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * 10**9, 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}
# The names jax's topology parser accepts (STACK.md: `v4-32` and `v5litepod-256` are refused).
TOPOLOGY_RE = re.compile(r"^([a-zA-Z0-9_ ]+)[=_:]([0-9x]+)(_twisted|_untwisted)?$")


# Dense bf16 tensor-core peaks from NVIDIA's data sheets, by the target config's device name (HBM size and
# bandwidth come from the target config itself).
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def gpu_chip(target_config: str) -> Chip:
    """The Chip of a GpuTargetConfigProto text (benchmarks/gpu_specs/*.txtpb)."""
    def field(name: str) -> str:
        m = re.search(rf"\b{name}:\s*\"?([^\"\n]+)\"?", target_config)
        if not m:
            raise ConfigError(f"--gpu_target_config: no {name} in the GPU target config")
        return m.group(1).strip()

    name = field("device_description_str")
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    if peak is None:
        raise ConfigError(f"--gpu_target_config: no peak FLOP/s for {name!r} in mlret.compile.GPU_PEAK_BF16")
    return Chip(name, int(field("device_memory_size")), peak, float(field("memory_bandwidth")),
                "the GPU target config; peak bf16 from NVIDIA's data sheet")


def chip_of(topology: str, gpu_target_config: str | None = None) -> Chip:
    if topology.startswith("gpu:"):
        if not gpu_target_config:
            raise ConfigError(f"--topology {topology}: a GPU topology needs --gpu_target_config FILE "
                              "(e.g. benchmarks/gpu_specs/h100_sxm.txtpb)")
        return gpu_chip(Path(gpu_target_config).read_text())
    m = TOPOLOGY_RE.match(topology)
    if not m:
        raise ConfigError(f"--topology {topology!r}: not a topology name; write GENERATION:SHAPE, e.g. v4:2x2x1, "
                          "v5e:4x4, v5p:4x4x4, v6e:16x16")
    gen = m.group(1).lower()
    if gen not in CHIPS:
        raise ConfigError(f"--topology {topology!r}: no HBM / FLOP/s figures for {gen!r} in mlret.compile.CHIPS "
                          f"(known: {', '.join(CHIPS)})")
    return CHIPS[gen]


# --------------------------------------------------------------------------------------------------------------
# Model architectures without weights.

# config.json fields of the paper's start models, for --model_config builtin only (this machine has no copy of
# them): copied from the hub files (huggingface.co/<id>/blob/main/config.json). A folder's own config.json, or
# --model_config PATH, always wins.
BUILTIN_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "xlm-roberta-base": dict(
        model_type="xlm-roberta", vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        layer_norm_eps=1e-5, hidden_act="gelu"),
    "xlm-roberta-large": dict(
        model_type="xlm-roberta", vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
        num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
        pad_token_id=1, layer_norm_eps=1e-5, hidden_act="gelu"),
    "sentence-transformers/LaBSE": dict(
        model_type="bert", vocab_size=501153, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
        layer_norm_eps=1e-12, hidden_act="gelu"),
}


def model_config_json(config: Any, model_config: str | None) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, where it came from): `--model_config PATH`, `--model_config builtin`
    (`BUILTIN_MODEL_CONFIGS`), else config.model.name's own config.json (a folder, or the hub cache)."""
    name = str(config.model.name)
    if model_config == "builtin":
        if name not in BUILTIN_MODEL_CONFIGS:
            raise ConfigError(f"--model_config builtin: no built-in architecture for config.model.name={name!r} "
                              f"(known: {', '.join(BUILTIN_MODEL_CONFIGS)}); pass --model_config path/to/config.json")
        return dict(BUILTIN_MODEL_CONFIGS[name]), f"mlret.compile.BUILTIN_MODEL_CONFIGS[{name!r}]"
    if model_config:
        path = Path(model_config).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"--model_config {model_config}: no such file (a config.json or a model folder)")
        return json.loads(path.read_text()), str(path)
    if not name:
        raise ConfigError("config.model.name is empty; set it, or pass --model_config path/to/config.json")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"config.model.name={name}: the folder has no config.json")
        return json.loads((path / "config.json").read_text()), str(path / "config.json")
    try:
        cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
    except Exception:  # not a repo id, or no hub library
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return json.loads(Path(cached).read_text()), cached
    hint = " or --model_config builtin" if name in BUILTIN_MODEL_CONFIGS else ""
    raise ConfigError(f"config.model.name={name!r}: its config.json is not on this machine (mlret.compile reads no "
                      f"weights and downloads nothing); pass --model_config path/to/config.json{hint}")


def _read_architecture(raw: dict[str, Any], where: str) -> Any:
    """The encoder family's config of a config.json dict (mlret.models.family)."""
    from mlret.models.family import read_hf_config  # lazy: jax after JAX_PLATFORMS

    return read_hf_config(raw, where=where)


def _encoder_module(cfg: Any, **kwargs: Any) -> Any:
    from mlret.models.family import family_of  # lazy: jax after JAX_PLATFORMS

    return family_of(cfg).module(cfg, **kwargs)


def abstract_model_fn(config: Any, arch: Any) -> Callable[[], Any]:
    """A function that builds the run's DualEncoder (random weights, never materialised: call it under
    `jax.eval_shape`) as `mlret.models.load_dual_encoder` assembles it, minus the weights. The pooler exists
    when config.model.pooling is 'pooler' (a checkpoint's pooler weights are not read here)."""
    from flax import nnx  # lazy: jax after JAX_PLATFORMS

    from mlret.models import DualEncoder, Tied, Untied  # lazy: jax after JAX_PLATFORMS

    m = config.model

    def build():
        kw = dict(with_pooler=m.pooling == "pooler", dtype=m.compute_dtype, remat=bool(m.remat),
                  attention=m.get("attention", "auto"))
        query = _encoder_module(arch, rngs=nnx.Rngs(0), **kw)
        towers = Tied(query) if m.tied else Untied(query, _encoder_module(arch, rngs=nnx.Rngs(1), **kw))
        return DualEncoder(towers, pooling=m.pooling, normalize=m.normalize)

    return build


# --------------------------------------------------------------------------------------------------------------
# Topology, mesh, train step.


def topology_devices(topology: str, num_slices: int = 1, gpu_target_config: str | None = None) -> list[Any]:
    """Compile-only devices of `topology` (x `num_slices`), from libtpu; nothing runs on them. `gpu:SxHxD`
    (slices x hosts x GPUs per host) with `gpu_target_config` gives compile-only CUDA devices instead (jax's
    deviceless GPU compile: the CUDA plugin, no GPU)."""
    chip_of(topology, gpu_target_config)
    if num_slices < 1:
        raise ConfigError(f"--num_slices {num_slices}: must be >= 1")
    from jax.experimental import topologies  # lazy: jax after JAX_PLATFORMS

    if topology.startswith("gpu:"):
        if importlib.util.find_spec("jax_plugins.xla_cuda13") is None and importlib.util.find_spec(
                "jax_plugins.xla_cuda12") is None:
            raise ConfigError("no CUDA plugin for jax: pip install jax-cuda13-plugin jax-cuda13-pjrt (the same "
                              "version as jax; no GPU or CUDA libraries needed to compile)")
        try:
            topo = topologies.get_topology_desc(platform="cuda", target_config=Path(gpu_target_config).read_text(),
                                                topology=topology.split(":", 1)[1])
        except Exception as e:
            raise ConfigError(f"--topology {topology}: the CUDA plugin refused it ({' '.join(str(e).split())[:300]})"
                              ) from None
        return list(topo.devices)
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("libtpu is not installed: pip install -e '.[tpu]' (jax[tpu], the XLA:TPU compiler; no "
                          "TPU needed)")
    # Compile-only use needs no exclusive TPU: without this, a second process (a test's subprocess, two checks at
    # once) fails on libtpu's /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # v4 and v5p chips have two TensorCores that jax drives as one "megacore" device (one device per chip, as on
    # the real pod); without it the topology has a device per core, which jax's mesh construction refuses.
    generation = TOPOLOGY_RE.match(topology).group(1).lower()
    kwargs = {"chip_config_name": "megacore"} if generation in ("v4", "v5p") else {}
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=num_slices, **kwargs)
    except Exception as e:  # the plugin's message, on one line
        raise ConfigError(f"--topology {topology}: libtpu refused it ({' '.join(str(e).split())[:300]})") from None
    return list(topo.devices)


@dataclasses.dataclass
class Built:
    """The run's trainer on the topology's mesh, with the abstract state and batch its step is lowered with."""

    trainer: Any
    arch: Any
    model_fn: Callable[[], Any]
    state: Any  # ShapeDtypeStructs with shardings
    batch: dict[str, Any]  # ShapeDtypeStructs with shardings
    rows: dict[str, int]  # rows the encoder runs per step: queries / passages (packed: rows of the packed batch)


def check_run(config: Any, devices: Sequence[Any], num_slices: int) -> int:
    """The checks `mlret.config.validate(devices=...)` makes of the mesh and the batch split, for the topology's
    devices and hosts; returns the data-parallel size."""
    from mlret import config as config_lib  # lazy: jax after JAX_PLATFORMS
    from mlret import parallel  # lazy: jax after JAX_PLATFORMS

    config_lib.validate(config)
    if num_slices > 1 and int(config.mesh.dcn_data) != num_slices:
        raise ConfigError(f"config.mesh.dcn_data={config.mesh.dcn_data} but the topology has {num_slices} slices: "
                          f"set --config.mesh.dcn_data={num_slices} (the data axis across slices, over the DCN)")
    hosts = len({d.process_index for d in devices})
    dp = parallel.validate_mesh(config, len(devices), hosts)
    chunk = int(config.train.grad_cache_chunk)
    if chunk % dp:
        raise GradCacheError(f"config.train.grad_cache_chunk={chunk} is not a multiple of the data-parallel size "
                             f"{dp}; use a multiple of {dp}")
    return dp


def packed_rows(config: Any, dp: int, fill: float) -> tuple[int, int]:
    """(query rows, passage rows) of a packed global batch when texts use `fill` of their static length on
    average: each (shard, chunk) piece of mlret.data.packing gets ceil(texts x fill) rows, rounded up to
    config.data.packing_rows_multiple. The real count depends on the batch's texts (first-fit decreasing of
    their lengths); `fill` stands for it."""
    b, g = int(config.data.global_batch), int(config.data.group_size)
    chunk = int(config.train.grad_cache_chunk)
    chunks = b // chunk if chunk else 1
    per = b // (dp * chunks)
    mult = int(config.data.packing_rows_multiple)
    q = round_up(max(1, math.ceil(per * fill)), mult)
    p = round_up(max(1, math.ceil(per * g * fill)), mult)
    return dp * chunks * q, dp * chunks * p


def batch_shapes(config: Any, fields: Sequence[str], dp: int, fill: float,
                 dim: int) -> tuple[dict[str, tuple[tuple, str]], dict]:
    """(shape, dtype) of the step's batch fields, padded or packed, and the encoder rows per step; `dim` is the
    model's embedding size (the embedding-distillation targets)."""
    b, g = int(config.data.global_batch), int(config.data.group_size)
    lq, lp = int(config.data.query_len), int(config.data.passage_len)
    if config.data.packing:
        rq, rp = packed_rows(config, dp, fill)
        known = {"query_ids": (rq, lq), "query_segments": (rq, lq), "passage_ids": (rp, lp),
                 "passage_segments": (rp, lp)}
        rows = {"query": rq, "passage": rp}
    else:
        known = {"query_ids": (b, lq), "query_mask": (b, lq), "passage_ids": (b, g, lp), "passage_mask": (b, g, lp)}
        rows = {"query": b, "passage": b * g}
    out = {f: (shape, "int32") for f, shape in known.items()}
    # The losses' float fields (mlret.data.pipeline's contract): teacher scores per candidate, the embedding
    # distillation's targets and mask.
    out |= {"teacher_scores": ((b, g), "float32"), "teacher_query": ((b, dim), "float32"),
            "teacher_passage": ((b, dim), "float32"), "teacher_mask": ((b,), "float32")}
    # Every other field of the data contract (unit_id, languages, ...) is one int32 per pair.
    return {f: out.get(f, ((b,), "int32")) for f in fields}, rows


def build(config: Any, devices: Sequence[Any], dp: int, raw_model: dict[str, Any], where: str,
          fill: float) -> Built:
    """The run's trainer over `devices`, built abstractly: `build_train_step` runs under `jax.eval_shape`, so the
    model's random initialisation is traced, never computed, and nothing is placed on the (compile-only) devices."""
    import jax  # lazy: jax after JAX_PLATFORMS
    import jax.numpy as jnp  # lazy: jax after JAX_PLATFORMS
    from flax import nnx  # lazy: jax after JAX_PLATFORMS

    from mlret import parallel  # lazy: jax after JAX_PLATFORMS
    from mlret.step import build_train_step  # lazy: jax after JAX_PLATFORMS

    try:
        arch = _read_architecture(raw_model, where)
    except (ValueError, KeyError) as e:
        raise ConfigError(str(e)) from None
    for field in ("query_len", "passage_len"):
        if int(config.data[field]) > arch.max_length:
            raise ConfigError(f"config.data.{field}={config.data[field]} exceeds the model's {arch.max_length} "
                              f"positions ({where}); lower it to <= {arch.max_length}")
    mesh = parallel.make_mesh(config.mesh, devices)
    model_fn = abstract_model_fn(config, arch)
    box: dict[str, Any] = {}

    def make():
        with nnx.use_eager_sharding(False):
            model = model_fn()
        trainer, params = build_train_step(model, config, mesh)
        box["trainer"] = trainer
        return params

    jax.eval_shape(make)
    trainer = box["trainer"]
    if jax.tree.leaves(trainer.rest):
        raise AssertionError("the model has non-parameter state; mlret.compile cannot build it abstractly")
    shapes, rows = batch_shapes(config, list(trainer.batch_shardings), dp, fill, int(arch.hidden_size))
    batch = {f: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=trainer.batch_shardings[f])
             for f, (shape, dtype) in shapes.items()}
    return Built(trainer=trainer, arch=arch, model_fn=model_fn, state=trainer.abstract_state(), batch=batch,
                 rows=rows)


# --------------------------------------------------------------------------------------------------------------
# What the compiled program says.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES)
                    + r")(-start)?\((.*)$")
_WHILE = re.compile(r"\bwhile\(.*?\bbody=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"\b(?:calls|to_apply|branch_computations|body)=\{?%?([\w.\-, %]+)\}?")


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(x) for x in dims.split(",") if x)) for dt, dims in _SHAPE.findall(text)
            if dt in _DTYPE_BYTES]


def _nbytes(dt: str, dims: tuple[int, ...]) -> int:
    return _DTYPE_BYTES[dt] * math.prod(dims)


def collectives(hlo: str) -> list[dict[str, Any]]:
    """Every collective of a compiled (per-device) HLO module: kind, result shape and bytes per device, the
    computation it sits in and how often it runs per step (the trip count of the while loops around it, e.g.
    the gradient-cache scans; 1 outside loops). Asynchronous pairs count once (the `-start`), and so does a
    collective that XLA:TPU copies into several fusions (the copies share its `channel_id`). XLA:TPU's
    reduce-scatters (mesh.fsdp's gradients) are fusions calling an `all-reduce-scatter.N` computation: they count
    as reduce-scatters of the computation's result (each device's shard)."""
    comp_of_line: list[str] = []
    current = ""
    results: dict[str, str] = {}  # computation -> its result type (after "->" in its header)
    lines = hlo.splitlines()
    for line in lines:
        if line and not line[0].isspace() and line.rstrip().endswith("{") and not line.startswith("HloModule"):
            current = line.removeprefix("ENTRY").split()[0].lstrip("%")
            results[current] = line.rpartition("->")[2]
        comp_of_line.append(current)
    # How often each computation runs: while bodies x their known trip count, nested through their callers.
    edges: list[tuple[str, str, int]] = []
    for line, comp in zip(lines, comp_of_line):
        w = _WHILE.search(line)
        if w:
            t = _TRIP.search(line)
            edges.append((comp, w.group(1), int(t.group(1)) if t else 1))
            cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
            if cond:
                edges.append((comp, cond.group(1), int(t.group(1)) if t else 1))
            continue
        for c in _CALLS.findall(line):
            for name in c.replace("%", "").split(","):
                if name.strip():
                    edges.append((comp, name.strip(), 1))
    runs: dict[str, int] = {}
    entry = next((x.removeprefix("ENTRY").split()[0].lstrip("%") for x in lines if x.startswith("ENTRY")), None)
    if entry:
        runs[entry] = 1
        for _ in range(8):  # enough passes for the nesting depths seen (scan in scan)
            for caller, callee, n in edges:
                if caller in runs:
                    runs[callee] = max(runs.get(callee, 0), runs[caller] * n)
    out: dict[Any, dict[str, Any]] = {}
    for i, (line, comp) in enumerate(zip(lines, comp_of_line)):
        m = _INSTR.match(line)
        if not m:
            continue
        name, result, kind = m.group(1), m.group(2), m.group(3)
        if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
            # XLA:TPU writes a reduce-scatter (FSDP's gradient reduction) as a fusion calling a computation
            # `all-reduce-scatter.N`: an all-reduce of the whole arrays inside, each device keeping its shard,
            # which is the computation's result.
            kind, result = "reduce-scatter", results[comp]
        shapes = _shapes(result)
        if not shapes:
            continue
        # A combined collective returns a tuple (one array per operand: the gradients' all-reduce); an async
        # all-gather / collective-permute start returns (operands, outputs): the outputs are the data moved.
        if m.group(4) and kind in ("all-gather", "collective-permute") and len(shapes) % 2 == 0:
            shapes = shapes[len(shapes) // 2:]
        dt, dims = max(shapes, key=lambda s: _nbytes(*s))
        channel = re.search(r"\bchannel_id=(\d+)", line)
        # Each all-reduce-scatter computation is its own collective (one fusion calls it), though XLA:TPU numbers
        # the all-reduces inside all of them channel 1.
        key = i if not channel else (kind, channel.group(1), comp) if kind == "reduce-scatter" else (
            kind, channel.group(1))
        op = {"kind": kind, "name": name, "shape": f"{dt}[{','.join(map(str, dims))}]", "dims": dims,
              "arrays": len(shapes), "bytes": sum(_nbytes(*s) for s in shapes), "computation": comp,
              "runs_per_step": runs.get(comp, 1)}
        if key in out:
            out[key]["runs_per_step"] = max(out[key]["runs_per_step"], op["runs_per_step"])
        else:
            out[key] = op
    return list(out.values())


def classify_gathers(colls: list[dict[str, Any]], config: Any, arch: Any, param_shapes: set[tuple[int, ...]],
                     dp: int = 1, split_layouts: set[tuple[int, ...]] = frozenset()) -> None:
    """Label each collective by what it moves: a weight (or its gradient), activations (an axis of a text
    length), or embeddings (last axis the hidden size, no length axis: the loss's gather). The design says a
    step gathers embeddings only, unless mesh.fsdp shards the weights."""
    b, g, d = int(config.data.global_batch), int(config.data.group_size), int(arch.hidden_size)
    lengths = {int(config.data.query_len), int(config.data.passage_len)}
    for c in colls:
        dims = tuple(c["dims"])
        # Embeddings are [n, D], [B, G, D], or [dp, rows per shard, D] (packed pooling); checked before the
        # length axes, since a row count may equal a length (the smoke config: B x G = query_len = 32).
        # XLA:GPU may lay a gathered [n, D] out as [D, n] (the score matmul's operand layout).
        transposed = len(dims) == 2 and dims[0] == d and dims[1] != d and dims[1] not in lengths
        embedding = dims and dims[-1] == d and (len(dims) == 2 or dims[:2] == (b, g)
                                                or (len(dims) == 3 and dims[0] == dp and dims[1] not in lengths))
        # A split weight may be gathered with its shards as an extra axis: XLA:TPU gathers the fsdp-split [2, D]
        # token-type table as [fsdp, D / fsdp, 2].
        # The loss's [B x G, D] (or [B, D]) may have a weight's shape too: LaBSE's 512 x 768 position table at
        # batch 256, G = 2 (v5e-256). A lone array of that shape is the loss's (its gather lowered as an
        # all-reduce, and its gradient); weight gradients travel in the combined all-reduce of every gradient.
        loss_shape = len(dims) == 2 and dims[1] == d and dims[0] in (b, b * g) and c.get("arrays", 1) == 1
        if (dims in param_shapes or tuple(sorted(dims)) in split_layouts) and not loss_shape:
            c["what"] = "weights" if c["kind"] == "all-gather" else "weights or gradients"
        elif embedding or transposed:
            n = dims[1] if transposed else math.prod(dims[:-1])
            c["what"] = ("passage embeddings" if n >= b * g else "query embeddings" if n >= b
                         else "embeddings (part of the batch)")
        elif any(x in lengths for x in dims[:-1]) or (len(dims) > 1 and dims[-1] in lengths):
            c["what"] = "activations"
        elif dims in ((b,), (b * g,)):
            c["what"] = "per-pair values"  # e.g. the positives' scores or the unit ids, a scalar per text
        else:
            c["what"] = "other"


def summarise_collectives(colls: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for c in colls:
        k = out.setdefault(c["kind"], {"count": 0, "bytes_per_step": 0})
        k["count"] += c["runs_per_step"]
        k["bytes_per_step"] += c["bytes"] * c["runs_per_step"]
    return out


def memory_report(compiled: Any, chip: Chip, headroom: float) -> dict[str, Any]:
    m = compiled.memory_analysis()
    parts = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "generated_code",
                                                                  "alias")}
    total = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["generated_code"]
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    used = max(total, peak)
    return {**{f"{k}_bytes": v for k, v in parts.items()}, "total_bytes": total, "peak_bytes": peak,
            "hbm_bytes": chip.hbm_bytes, "headroom": headroom, "fits": used <= chip.hbm_bytes * (1 - headroom),
            "fraction_of_hbm": used / chip.hbm_bytes}


def cost(compiled: Any) -> dict[str, float]:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    if not c:  # XLA:GPU's compile-only executables have no cost analysis (None): the formula stands alone
        return {"flops": None, "bytes_accessed": None, "optimal_seconds": None}
    return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed", 0.0)),
            "optimal_seconds": float(c.get("optimal_seconds", 0.0))}


def formula_flops(config: Any, arch: Any, rows: dict[str, int]) -> int:
    """mlret.flops' matmul count of one step (forward + backward, the loss's score matrix) for the rows the
    encoder runs: B queries and B x G passages padded, or the packed batch's rows."""
    from mlret import flops  # lazy: jax after JAX_PLATFORMS

    b, g = int(config.data.global_batch), int(config.data.group_size)
    fwd = (flops.encoder_forward_flops(arch, rows["query"], int(config.data.query_len))
           + flops.encoder_forward_flops(arch, rows["passage"], int(config.data.passage_len))
           + flops.loss_forward_flops(b, g, int(arch.hidden_size)))
    return 3 * fwd


def expected_compiler_ratio(config: Any) -> float:
    """Compiler FLOPs / formula FLOPs the design implies: remat and gradient caching each re-run the encoder's
    forward pass once (4/3 each, 5/3 together); the formula counts forward + backward = 3 forward passes."""
    extra = int(bool(config.model.remat)) + int(int(config.train.grad_cache_chunk) > 0)
    return (3 + extra) / 3


# --------------------------------------------------------------------------------------------------------------
# The check.


class DoesNotFit(ConfigError):
    """The step needs more HBM than the chip has (with the headroom asked for)."""


def oom_hint(config: Any, mem: dict[str, Any] | None, dp: int) -> str:
    """Which config fields would make the step fit, in the order worth trying."""
    hints = []
    chunk = int(config.train.grad_cache_chunk)
    if chunk == 0:
        hints.append(f"train.grad_cache_chunk (gradient caching: encode the batch in chunks, e.g. {dp * 8}, a multiple"
                     f" of the data-parallel size {dp} dividing data.global_batch)")
    elif chunk > dp:
        hints.append(f"train.grad_cache_chunk (lower it from {chunk}, keeping a multiple of {dp})")
    if not config.model.remat:
        hints.append("model.remat=True (recompute each layer in the backward pass)")
    if config.model.compute_dtype != "bfloat16":
        hints.append("model.compute_dtype=bfloat16")
    if mem and mem["argument_bytes"] > 0.3 * mem["hbm_bytes"]:
        hints.append(f"mesh.fsdp (shard the weights and AdamW state: they take {mem['argument_bytes'] / GiB:.1f} "
                     "GiB per chip)")
    hints.append(f"data.global_batch (now {config.data.global_batch}), or data.passage_len / data.query_len")
    return "change " + "; ".join(hints)


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()


def compile_encode(config: Any, built: Built, devices_mesh: Any) -> tuple[Any, float, dict[str, Any]]:
    """The evaluation passage encoder the run would use (`mlret.eval.encode`'s jitted functions) over the trained
    weights, and its call's shape: packed rows (config.eval.packing and a model with a packed path, as
    `ShardedEmbedder` decides) at the widest call, the eval length (the most attention memory for the call's
    `PACK_TOKENS` tokens; its rows a multiple of the data-parallel size, as `pack_calls` makes them); else padded
    batches of config.eval.batch_size (rounded up to the data-parallel size as the embedder does) at the eval
    length. Out of HBM: DoesNotFit naming the field of the layout it compiled."""
    import jax  # lazy: jax after JAX_PLATFORMS
    import jax.numpy as jnp  # lazy: jax after JAX_PLATFORMS
    from flax import nnx  # lazy: jax after JAX_PLATFORMS

    from mlret import parallel  # lazy: jax after JAX_PLATFORMS
    from mlret.eval.encode import PACK_TOKENS, _encode_fn, _packed_fn, packed_path  # lazy: jax after JAX_PLATFORMS

    rules = parallel.parse_rules(config.mesh.rules)
    mesh = devices_mesh
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(built.model_fn)
    graphdef, state = nnx.split(model)
    shardings = nnx.to_pure_dict(parallel.state_shardings(state, mesh, rules))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                                 nnx.to_pure_dict(state), shardings))
    dp = parallel.data_parallel_size(rules, mesh)
    length = int(config.eval.passage_len or config.data.passage_len)
    packed = bool(config.eval.packing) and packed_path(model) is None
    if packed:
        b = max(dp, PACK_TOKENS // length // dp * dp)
        fn = _packed_fn(graphdef, "passage", mesh, rules, dp)
    else:
        b = max(dp, math.ceil(int(config.eval.batch_size) / dp) * dp)
        fn = _encode_fn(graphdef, "passage", mesh, rules)
    spec = parallel.batch_spec(rules, mesh)
    ids = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=jax.sharding.NamedSharding(mesh, spec))
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = fn.lower(state, ids, ids).compile()
    except Exception as e:
        if not _is_oom(e):
            raise
        field = ("eval.passage_len (the packed calls' width)" if packed
                 else f"eval.batch_size (now {config.eval.batch_size})")
        raise DoesNotFit(f"does not fit: lower {field}") from None
    return compiled, time.perf_counter() - t0, {"layout": "packed" if packed else "padded", "rows": b,
                                                "length": length}


def check(config: Any, topology: str, *, num_slices: int = 1, model_config: str | None = None,
          headroom: float = 0.1, pack_fill: float = 0.5, eval_step: bool = True,
          devices: Sequence[Any] | None = None, hlo_out: str | None = None,
          gpu_target_config: str | None = None) -> dict[str, Any]:
    """Compile the run's train step (and the evaluation encoder) for `topology`; the report as a dict.

    Raises `DoesNotFit` (naming the fields to change) when the step needs more HBM than the chip has, and
    ConfigError for a config the topology cannot run."""
    chip = chip_of(topology, gpu_target_config)
    devices = (list(devices) if devices is not None
               else topology_devices(topology, num_slices, gpu_target_config))
    dp = check_run(config, devices, num_slices)
    raw, where = model_config_json(config, model_config)
    t0 = time.perf_counter()
    built = build(config, devices, dp, raw, where, pack_fill)
    build_s = time.perf_counter() - t0
    report: dict[str, Any] = {
        "topology": topology, "num_slices": num_slices, "chips": len(devices), "chip": dataclasses.asdict(chip),
        "hosts": len({d.process_index for d in devices}), "mesh": dict(built.trainer.mesh.shape),
        "data_parallel": dp, "model_config": where,
        "settings": {"global_batch": int(config.data.global_batch), "group_size": int(config.data.group_size),
                     "query_len": int(config.data.query_len), "passage_len": int(config.data.passage_len),
                     "packing": bool(config.data.packing), "pack_fill": pack_fill if config.data.packing else None,
                     "grad_cache_chunk": int(config.train.grad_cache_chunk), "remat": bool(config.model.remat),
                     "compute_dtype": str(config.model.compute_dtype), "gather": str(config.loss.gather),
                     "fsdp": int(config.mesh.fsdp), "tensor": int(config.mesh.tensor),
                     "dcn_data": int(config.mesh.dcn_data)},
        "batch_shapes": {k: list(v.shape) for k, v in built.batch.items()},
        "build_seconds": round(build_s, 2),
    }
    t0 = time.perf_counter()
    # Lowered outside the try: an error while tracing the step is mlret's or the config's and is raised as it is;
    # only XLA's compilation errors are reported as the compiler's.
    lowered = built.trainer.step.lower(built.state, built.batch)
    try:
        compiled = lowered.compile()
    except Exception as e:
        if _is_oom(e):
            need = re.search(r"required for [^(]*\(([^)]+)\) exceeds available HBM \(([^)]+)\)", str(e))
            amount = f" (XLA: {need.group(1)} needed, {need.group(2)} available)" if need else ""
            raise DoesNotFit(f"the train step does not fit in {chip.name} HBM{amount} at "
                             f"data.global_batch={config.data.global_batch}: {oom_hint(config, None, dp)}") from None
        raise ConfigError(f"XLA:TPU rejected the train step for {topology}: {' '.join(str(e).split())[:400]}; "
                          "check model.attention, data.query_len / data.passage_len and mesh.tensor") from None
    seconds = time.perf_counter() - t0
    mem = memory_report(compiled, chip, headroom)
    c = cost(compiled)
    hlo = compiled.as_text()
    if hlo_out:
        Path(hlo_out).write_text(hlo)
    colls = collectives(hlo)
    # Each weight's shape and its shard's; for a split weight also its shard with the number of shards as one more
    # axis, dimensions sorted (how XLA:TPU may gather it).
    param_shapes: set[tuple[int, ...]] = set()
    split_layouts: set[tuple[int, ...]] = set()
    for x in _leaves(built.state["params"]):
        whole, shard = tuple(x.shape), tuple(x.sharding.shard_shape(tuple(x.shape)))
        param_shapes |= {whole, shard}
        if shard != whole:
            split_layouts.add(tuple(sorted((*shard, math.prod(whole) // math.prod(shard)))))
    classify_gathers(colls, config, built.arch, param_shapes, dp, split_layouts)
    n = len(devices)
    model_flops = formula_flops(config, built.arch, built.rows)
    compiler_total = None if c["flops"] is None else c["flops"] * n  # cost_analysis: one device's program
    # XLA's cost analysis counts a while loop's body once, whatever its trip count: with gradient caching (two
    # scans over the chunks) the compiler's figure misses most of the encoder. The matmul count the design
    # implies (formula x expected ratio) is then the larger, and still a lower bound.
    design = model_flops * expected_compiler_ratio(config) / n
    t_compute = max(c["flops"] or 0.0, design) / chip.peak_bf16_flops
    # Without the compiler's HBM traffic (GPU) the bound is the compute time alone.
    t_memory = None if c["bytes_accessed"] is None else c["bytes_accessed"] / chip.hbm_bytes_per_s
    bound = max(t_compute, t_memory or 0.0)
    report.update({
        "compile_seconds": round(seconds, 2),
        "memory": mem,
        "flops": {"compiler_per_chip": c["flops"], "compiler_total": compiler_total, "formula_total": model_flops,
                  "compiler_over_formula": (compiler_total / model_flops if model_flops and compiler_total is not None
                                            else None),
                  "expected_ratio": expected_compiler_ratio(config),
                  "loops_counted_once": int(config.train.grad_cache_chunk) > 0,
                  "bytes_accessed_per_chip": c["bytes_accessed"]},
        "collectives": {"by_kind": summarise_collectives(colls), "ops": [
            {k: v for k, v in x.items() if k != "dims"} for x in colls]},
        "loss_gather": _loss_gather(colls),
        "roofline": {"compute_seconds": t_compute, "memory_seconds": t_memory, "step_seconds_lower_bound": bound,
                     "bound_by": ("compute" if t_memory is not None and t_compute >= t_memory else "hbm bandwidth"
                                  if t_memory is not None else "compute (no HBM traffic figure from the compiler)"),
                     "examples_per_second_upper_bound": int(config.data.global_batch) / bound if bound else None,
                     "mfu_at_bound": model_flops / (n * chip.peak_bf16_flops * bound) if bound else None,
                     "leaves_out": "collective time (ICI / DCN), host input, kernel launch and overlap limits"},
    })
    if not mem["fits"]:
        report["verdict"] = (f"does not fit: {mem['fraction_of_hbm']:.0%} of {chip.name} HBM with {headroom:.0%} "
                             f"headroom asked; {oom_hint(config, mem, dp)}")
    else:
        report["verdict"] = f"fits: {mem['fraction_of_hbm']:.0%} of {chip.name} HBM"
    if eval_step:
        try:
            enc, enc_s, call = compile_encode(config, built, built.trainer.mesh)
            emem = memory_report(enc, chip, headroom)
            # During training the train state stays on the chips while evaluation encodes.
            resident = mem["argument_bytes"] + emem["temp_bytes"] + emem["output_bytes"] + emem["generated_code_bytes"]
            report["eval_encode"] = {**call, "compile_seconds": round(enc_s, 2), "memory": emem,
                                     "flops_per_chip": cost(enc)["flops"],
                                     "with_train_state_bytes": resident,
                                     "fits_beside_train_state": resident <= chip.hbm_bytes * (1 - headroom)}
        except DoesNotFit as e:  # the encoder's own out-of-memory, naming the field to lower
            report["eval_encode"] = {"error": str(e)}
    return report


def _leaves(tree: Any) -> list[Any]:
    import jax  # lazy: jax after JAX_PLATFORMS

    return jax.tree.leaves(tree)


def _loss_gather(colls: list[dict[str, Any]]) -> dict[str, Any]:
    gathers = [c for c in colls if c["kind"] == "all-gather"]
    emb = [c for c in gathers if "embeddings" in c.get("what", "")]
    other = [c for c in gathers if c not in emb]
    # All-reduces of an embedding's shape: the gather's gradient (on TPU), a gather XLA lowered as an all-reduce
    # (one or two rows per chip), or pooling over the whole batch (packed rows pooled over global text indices).
    reduces = [c for c in colls if c["kind"] == "all-reduce" and "embeddings" in c.get("what", "")]
    return {"embedding_all_reduces_per_step": sum(c["runs_per_step"] for c in reduces),
            "embedding_all_reduce_shapes": sorted({c["shape"] for c in reduces}),
            "embedding_gathers_per_step": sum(c["runs_per_step"] for c in emb),
            "embedding_gather_shapes": sorted({c["shape"] for c in emb}),
            "other_gathers_per_step": sum(c["runs_per_step"] for c in other),
            "other_gather_shapes": sorted({f"{c['shape']} ({c['what']})" for c in other})}


# --------------------------------------------------------------------------------------------------------------
# The largest batch that fits.


def _fits(config: Any, topology: str, devices: Sequence[Any], num_slices: int, model_config: str | None,
          headroom: float, pack_fill: float, log: Callable[[str], None]) -> tuple[bool, dict | None]:
    try:
        r = check(config, topology, num_slices=num_slices, model_config=model_config, headroom=headroom,
                  pack_fill=pack_fill, eval_step=False, devices=devices)
    except DoesNotFit:
        log(f"  global_batch {config.data.global_batch:>7}: does not fit (compiler: out of HBM)")
        return False, None
    mem = r["memory"]
    log(f"  global_batch {config.data.global_batch:>7}: {mem['fraction_of_hbm']:.1%} of HBM, "
        f"{'fits' if mem['fits'] else 'over the headroom'} (compiled in {r['compile_seconds']:.0f} s)")
    return mem["fits"], r


def find_max_batch(config: Any, topology: str, *, num_slices: int = 1, model_config: str | None = None,
                   headroom: float = 0.1, pack_fill: float = 0.5, grad_cache_per_device: int = 0,
                   limit: int = 1 << 17, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The largest global batch (a multiple of the data-parallel size; with gradient caching, of the chunk) whose
    train step fits in HBM with `headroom`, by compiling: from the configured batch, doubling (or halving), then
    bisecting. With
    `grad_cache_per_device` > 0 the chunk is that many pairs per data-parallel device."""
    devices = topology_devices(topology, num_slices)
    from mlret import parallel  # lazy: jax after JAX_PLATFORMS

    _, fsdp, tensor = parallel.mesh_shape(config.mesh, len(devices))
    dp = len(devices) // (fsdp * tensor)
    config = _unlocked_copy(config)
    chunk = grad_cache_per_device * dp if grad_cache_per_device else 0
    config.train.grad_cache_chunk = chunk
    unit = chunk or dp
    log(f"{topology}: largest global batch, multiples of {unit}" + (f" (gradient cache chunk {chunk})" if chunk
                                                                       else " (no gradient caching)"))
    reports: dict[int, dict | None] = {}
    probes: list[dict[str, Any]] = []  # every compilation, in order

    def fits(n: int) -> bool:
        config.data.global_batch = n * unit
        ok, reports[n] = _fits(config, topology, devices, num_slices, model_config, headroom, pack_fill, log)
        r = reports[n]
        probes.append({"global_batch": n * unit, "fits": ok,
                       "fraction_of_hbm": r["memory"]["fraction_of_hbm"] if r else None,
                       "compile_seconds": r["compile_seconds"] if r else None})
        return ok

    # From the configured batch: double while it fits (to `limit`), or halve until it does; then bisect.
    n = max(1, int(config.data.global_batch) // unit)
    lo, hi = 0, None
    if fits(n):
        lo = n
        while hi is None and 2 * lo * unit <= limit:
            if fits(2 * lo):
                lo *= 2
            else:
                hi = 2 * lo
    else:
        hi = n
        while hi > 1 and lo == 0:
            if fits(hi // 2):
                lo = hi // 2
            else:
                hi //= 2
    while lo and hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    best, best_report = lo, reports.get(lo)
    return {"topology": topology, "grad_cache_chunk": chunk, "unit": unit, "headroom": headroom,
            "max_global_batch": best * unit, "hit_search_limit": hi is None and best > 0, "limit": limit,
            "memory": best_report["memory"] if best_report else None, "probes": probes}


def _unlocked_copy(config: Any) -> Any:
    return copy.deepcopy(config)


# --------------------------------------------------------------------------------------------------------------
# Printing.


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
    mem, fl, roof = r["memory"], r["flops"], r["roofline"]
    s = r["settings"]
    lines = [
        f"{r['topology']} x {r['num_slices']} slice(s): {r['chips']} chips on {r['hosts']} hosts, mesh {r['mesh']}, "
        f"data-parallel {r['data_parallel']}",
        f"step: batch {s['global_batch']} x G={s['group_size']}, lengths {s['query_len']}/{s['passage_len']}, "
        f"{'packed' if s['packing'] else 'padded'}, grad_cache_chunk {s['grad_cache_chunk']}, remat {s['remat']}, "
        f"{s['compute_dtype']}, gather {s['gather']}; compiled in {r['compile_seconds']:.1f} s",
        f"memory per chip: arguments {_gib(mem['argument_bytes'])}, outputs {_gib(mem['output_bytes'])} "
        f"(aliased {_gib(mem['alias_bytes'])}), temporaries {_gib(mem['temp_bytes'])}, generated code "
        f"{_gib(mem['generated_code_bytes'])}; total {_gib(mem['total_bytes'])} (peak {_gib(mem['peak_bytes'])}) of "
        f"{_gib(mem['hbm_bytes'])} HBM",
        f"verdict: {r['verdict']}",
        (f"FLOPs per step: compiler {fl['compiler_total']:.3e} (all chips), mlret.flops {fl['formula_total']:.3e}, "
         f"ratio {fl['compiler_over_formula']:.3f} (remat / gradient caching imply {fl['expected_ratio']:.3f})"
         if fl["compiler_total"] is not None else
         f"FLOPs per step: mlret.flops {fl['formula_total']:.3e} (the compiler gives no cost analysis for this "
         "target: XLA:GPU's compile-only executables have none)"),
        "collectives per step: " + (", ".join(f"{k} x{v['count']} {v['bytes_per_step'] / 2**20:.1f} MiB"
                                               for k, v in r["collectives"]["by_kind"].items()) or "none"),
        f"loss gather: {r['loss_gather']['embedding_gathers_per_step']} all-gather(s) of embeddings "
        f"{r['loss_gather']['embedding_gather_shapes']}; other all-gathers: "
        f"{r['loss_gather']['other_gather_shapes'] or 'none'}; all-reduces of embeddings (gradients, lowered gathers): "
        f"{r['loss_gather']['embedding_all_reduce_shapes'] or 'none'}",
        f"roofline: step >= {roof['step_seconds_lower_bound'] * 1e3:.1f} ms ({roof['bound_by']}), "
        f"<= {roof['examples_per_second_upper_bound']:.0f} pairs/s, MFU at the bound {roof['mfu_at_bound']:.1%} "
        f"(leaves out {roof['leaves_out']})",
    ]
    ev = r.get("eval_encode")
    if ev and "memory" in ev:
        lines.append(f"eval passage encoder: {ev['layout']} calls of {ev['rows']} x {ev['length']} tokens, "
                     f"{_gib(ev['memory']['total_bytes'])} alone, "
                     f"{_gib(ev['with_train_state_bytes'])} beside the train state "
                     f"({'fits' if ev['fits_beside_train_state'] else 'does NOT fit'}); compiled in "
                     f"{ev['compile_seconds']:.1f} s")
    elif ev:
        lines.append(f"eval passage encoder: {ev['error']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file[:arg], e.g. configs/paper.py:xlmr_base,hybrid")
    p.add_argument("--topology", required=True,
                   help="TPU topology, e.g. v4:2x2x1, v5e:4x4, v5p:4x4x4, v6e:16x16; or gpu:1x1x8 with "
                        "--gpu_target_config")
    p.add_argument("--num_slices", type=int, default=1, help="slices joined over the DCN (config.mesh.dcn_data)")
    p.add_argument("--gpu_target_config", default=None,
                   help="--topology gpu:SxHxD: the GPU's target config (benchmarks/gpu_specs/h100_sxm.txtpb)")
    p.add_argument("--model_config", default=None,
                   help="config.json (or folder) of the model's architecture, or 'builtin' for the paper's models")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--headroom", type=float, default=0.1, help="HBM fraction to keep free (default 0.1)")
    p.add_argument("--pack_fill", type=float, default=0.5,
                   help="packed batches: mean text length / static length, sets the packed row count (default 0.5)")
    p.add_argument("--hlo_out", default=None, help="write the train step's compiled TPU HLO here")
    p.add_argument("--no_eval", action="store_true", help="skip the evaluation encoder")
    p.add_argument("--find_max_batch", action="store_true",
                   help="find the largest global batch that fits, without and with gradient caching")
    p.add_argument("--grad_cache_per_device", type=int, default=32,
                   help="--find_max_batch: gradient-cache chunk in pairs per data-parallel device (default 32)")
    p.add_argument("--max_batch_limit", type=int, default=1 << 17, help="--find_max_batch: stop searching here")
    # mlret.train's own flags, so that a run's arguments can be passed as they are (launch/tpu_pod.sh does).
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments {bad}; config overrides look like --config.data.global_batch=1024")
    return args, rest


def load_config(spec: str, overrides: Sequence[str]) -> Any:
    from mlret import config as config_lib  # lazy: jax after JAX_PLATFORMS

    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        config = config_lib.load_config_file(path, arg or None)
    except ValueError as e:  # the config file's own argument check
        raise ConfigError(str(e)) from None
    config_lib.apply_overrides(config, list(overrides))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server here: do not wait for one
    # Compile-only devices need no backend: on the CPU, jax does not try to start the CUDA plugin for real (which
    # fails without cuDNN and then refuses the deviceless GPU topology) nor to claim a TPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        config = load_config(args.config, overrides)
        if args.find_max_batch:
            results = []
            for per_device in (0, args.grad_cache_per_device):
                results.append(find_max_batch(config, args.topology, num_slices=args.num_slices,
                                              model_config=args.model_config, headroom=args.headroom,
                                              pack_fill=args.pack_fill, grad_cache_per_device=per_device,
                                              limit=args.max_batch_limit))
                res = results[-1]
                more = " (the search limit; raise --max_batch_limit)" if res["hit_search_limit"] else ""
                print(f"{args.topology}: largest global batch with {args.headroom:.0%} HBM headroom, "
                      f"grad_cache_chunk={res['grad_cache_chunk']}: {res['max_global_batch']}{more}", flush=True)
            report: Any = {"find_max_batch": results}
        else:
            report = check(config, args.topology, num_slices=args.num_slices, model_config=args.model_config,
                           headroom=args.headroom, pack_fill=args.pack_fill, eval_step=not args.no_eval,
                           hlo_out=args.hlo_out, gpu_target_config=args.gpu_target_config)
            print(format_report(report), flush=True)
    except DoesNotFit as e:
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        return 3  # a run that cannot fit (launch/tpu_pod.sh stops here)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"report written to {args.out}")
    if not args.find_max_batch and not report["memory"]["fits"]:
        return 3  # a run that cannot fit (launch/tpu_pod.sh stops here)
    return 0


if __name__ == "__main__":
    sys.exit(main())
