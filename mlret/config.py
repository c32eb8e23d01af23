"""The experiment config: one schema with defaults, and validation before any device work.

Every experiment file in `configs/` starts from `default_config()` and changes fields; the returned
ConfigDict is locked, so a misspelt field (`c.data.alpah = 1`) fails in the config file itself, and
`--config.field=value` on the command line fails for a field the schema does not have. `validate()`
then rejects impossible combinations, naming the field, before anything compiles.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from mlret import losses
from mlret.data.sources import validate_data
from mlret.errors import ConfigError, GradCacheError
from mlret.eval import registry as eval_registry
from mlret.eval import validate_eval_config
from mlret.preflight import check_data, check_storage


def default_config() -> ml_collections.ConfigDict:
    """All fields mlret knows, with their defaults. Sections: model, data, loss, optim, mesh, train,
    checkpoint, eval, export."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Run directory for checkpoints, metrics.jsonl and TensorBoard events (`--workdir` overrides it).
    c.workdir = ""

    c.model = ml_collections.ConfigDict()
    # A Hugging Face hub id or a local folder; MLRET_MODEL fills it when set.
    c.model.name = os.environ.get("MLRET_MODEL", "")
    c.model.pooling = "mean"  # cls | mean | pooler | last (decoder embedders, e.g. Qwen3); the family says which apply
    # False: mean pooling leaves out the prefix tokens (sentence-transformers' Pooling include_prompt, exported as such)
    c.model.include_prompt = True
    c.model.normalize = True  # L2-normalise pooled embeddings
    c.model.query_prefix = ""  # the paper: "Query: "
    c.model.passage_prefix = ""  # the paper: "Passage: "
    c.model.tied = True  # one encoder for queries and passages; False: two towers
    c.model.compute_dtype = "float32"  # float32 | bfloat16 (params, optimizer state and loss stay float32)
    c.model.param_dtype = "float32"
    c.model.remat = False  # rematerialise each transformer layer in the backward pass
    c.model.attention = "auto"  # jax.nn.dot_product_attention implementation: auto | xla | cudnn (GPU, bf16)

    c.data = ml_collections.ConfigDict()
    # Root of the local data (the ../shared/data layout); MLRET_DATA_DIR fills it when set.
    c.data.data_dir = os.environ.get("MLRET_DATA_DIR", "")
    c.data.alpha = 0.5  # probability that a global batch is monolingual (1: X-X-mono, 0: X-Y)
    c.data.global_batch = 32  # pairs per global batch, over all hosts
    c.data.group_size = 2  # G: passages per pair, 1 positive + G-1 hard negatives
    c.data.query_len = 64
    c.data.passage_len = 192
    c.data.on_bad_record = "error"  # error | skip (skips are counted and logged)
    # Training sources, mixed per pair: a tuple of dicts {name, path, weight, split, languages, ...}. name is a
    # source kind of mlret.data (xquad_r, mlqa_r, mlqa, squad_translate, mmarco, tydiqa_goldp, miracl, mrtydi,
    # jsonl); path a local folder or file, relative to data_dir ("" downloads the public files).
    c.data.sources = ()
    c.data.mixture = "size"  # size: every eligible unit equally likely | weights: by each source's `weight`
    c.data.mono_lang_weights = ""  # X-X-mono language weights "en=2,de=1" ("": uniform over eligible languages)
    c.data.paragraph_context = False  # XQuAD-R / MLQA-R passages: the answer sentence followed by its paragraph
    c.data.max_negatives = 16  # hard negatives kept per unit and language when a source is prepared
    c.data.tfds_dir = ""  # where sources are prepared as ArrayRecord ("": $TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.worker_count = 0  # Grain worker processes assembling batches (0: threads of the training process)
    c.data.read_threads = 2  # threads per process assembling batches
    c.data.prefetch = 4  # batches buffered ahead per process
    # Pack several texts per row with segment ids (mlret.data.packing) instead of one padded text per row.
    c.data.packing = False
    c.data.packing_rows_multiple = 4  # packed row counts are rounded up to a multiple of this (few shapes)

    c.loss = ml_collections.ConfigDict()
    # The loss families trained with (comma-separated, mlret.losses): their sum, each weighted by its section's
    # `weight`. Each registered family has its section config.loss.<name> (contrastive: Eq. 1, InfoNCE, symmetric,
    # VRN); the contrastive fields are also reachable at their older names config.loss.symmetric, ... (aliases).
    c.loss.terms = "contrastive"
    c.loss.temperature = 0.05  # τ of every term's scores
    c.loss.learnable_temperature = False  # τ = exp(log_temperature), trained with the model
    # How passage embeddings reach every query: "constraint" (jit + a row-sharding constraint on the scores) or
    # "shard_map" (an explicit all_gather of the passages); both give the single-device loss and gradients.
    c.loss.gather = "constraint"
    # Matryoshka embeddings (sentence-transformers' MatryoshkaLoss): "" off, or nested dimensions "384,256,128,64":
    # the terms are also taken on each embedding's first d components, and the sums at every d are added, weighted
    # by matryoshka_weights (comma-separated, one per dimension; "": all 1). matryoshka_normalize L2-normalises each
    # prefix (cosine scores, as sentence-transformers' truncate_dim users compute them).
    c.loss.matryoshka_dims = ""
    c.loss.matryoshka_weights = ""
    c.loss.matryoshka_normalize = True
    losses.add_sections(c.loss)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-5
    c.optim.warmup_steps = 100
    c.optim.end_learning_rate_factor = 0.0  # linear decay to factor * learning_rate at train.steps
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.optim.max_nonfinite_in_row = 10  # stop the run after this many skipped (non-finite) updates in a row

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: whatever the other axes leave
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1  # data-parallel replicas across slices (hybrid mesh); 1 on one slice
    # >0: run on this many simulated CPU devices (XLA_FLAGS, set by mlret.train before jax starts); smoke runs.
    c.mesh.simulated_cpu_devices = 0
    # Weights with more elements than this must be sharded when the rules say so (else an error).
    c.mesh.replicated_param_threshold = 2**20
    # Logical axis -> mesh axis (a name, a tuple of names, or None = replicated); see mlret/parallel.py.
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv", "tensor"),  # key / value heads of grouped-query attention (Qwen3); replicated where they don't divide
        ("mlp", "tensor"),
        ("pos", None),
        ("type", None),
        ("norm", None),
    )

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.log_every = 10
    # Terminal verbosity of mlret.train (mlret.console): "warning" shows progress, evaluations, the final tables
    # and mlret's warnings; "info" (or --verbose) also every library's INFO lines; <workdir>/train.log gets those
    # always.
    c.train.log_level = "warning"
    c.train.grad_cache_chunk = 0  # >0: encode the global batch in chunks of this many pairs (GradCache)
    # jax's persistent compilation cache: programs that took over a second to compile are kept here and loaded,
    # not recompiled, by a restarted / resumed run or any later run with the same shapes and mesh ("": off;
    # JAX_COMPILATION_CACHE_DIR, when set, wins). Local path or a gs:// bucket shared by a pod's workers.
    c.train.compilation_cache_dir = "~/.cache/mlret/jax-compilation"
    # Every this many steps, glibc's malloc_trim(0) hands the freed memory in malloc's arenas back to the kernel
    # (mlret.hooks.TrimHostMemory: without it, resident memory creeps up over long runs while the memory in use
    # stays flat; 0: off).
    c.train.trim_host_memory_every = 100

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    # Keep the best checkpoint(s) by this eval metric as well ("" = latest only); mode max | min.
    c.checkpoint.best_metric = ""
    c.checkpoint.best_mode = "max"
    c.checkpoint.keep_best = 1
    # A damaged newest step (a file truncated, corrupted or missing against its manifest, or unreadable):
    # "previous" resumes from the step before it (with a warning naming step and file), "stop" ends the run.
    c.checkpoint.on_damaged = "previous"
    # SIGTERM (a preemption notice; a TPU VM gets about 30 s): the final checkpoint and exit must be done within
    # this many seconds, or the process exits anyway (status 143) with the last complete checkpoint kept.
    c.checkpoint.sigterm_grace_s = 25.0

    # Bounds on storage waits (mlret.storage; docs/robustness.md "Storage faults"). A request that moves no byte
    # for request_timeout_s fails and is retried (gcsfs: 6 tries; tensorstore: up to 32); one operation of the run
    # (a checkpoint save or commit, a restore, an upload, a copy) that outlasts op_timeout_s, retries included,
    # ends the run with exit status 75, the operation and the path named.
    c.storage = ml_collections.ConfigDict()
    c.storage.request_timeout_s = 30.0
    c.storage.op_timeout_s = 600.0

    # A multi-process run (mlret/supervise.py; docs/robustness.md "A dead worker"): a process whose heartbeats to
    # jax's coordination service stop for peer_timeout_s counts as dead, and every other process then exits with
    # status 76 and one line (when process 0 dies, within about a second). Also bounds the wait for the others at
    # the end of a run (jax's shutdown barrier).
    c.runtime = ml_collections.ConfigDict()
    c.runtime.peer_timeout_s = 60

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # 0: no evaluation during training
    # Also evaluate the start model before step 1 (zero-shot): the final tables and the model card show the
    # trained numbers beside it. A resumed run reads it back from metrics.jsonl.
    c.eval.at_start = False
    # Evaluators to run (comma-separated names of the sections below), in training and in `mlret.evaluate`.
    # The best checkpoint is picked by checkpoint.best_metric, named "<evaluator>/<summary key>".
    c.eval.evaluators = "xquad_r"
    c.eval.batch_size = 256  # global encoding batch, rounded up to a multiple of the data-parallel devices
    c.eval.query_len = 0  # 0: data.query_len
    c.eval.passage_len = 0  # 0: data.passage_len
    c.eval.query_prefix = ml_collections.config_dict.placeholder(str)  # None: model.query_prefix
    c.eval.passage_prefix = ml_collections.config_dict.placeholder(str)  # None: model.passage_prefix
    c.eval.output_dir = ""  # matrices + heatmaps; "": <workdir>/eval/step_N in training, beside --out in the CLI
    c.eval.plots = True  # heatmap PNGs next to the JSON matrices
    c.eval.progress = True  # tqdm bar with ETA while encoding (process 0 only)
    c.eval.length_buckets = True  # sort texts by length and cut batches to power-of-two lengths (less padding)
    # Pack evaluation texts into rows of a few fixed widths (mlret/eval/encode.py; the same embeddings, far less
    # padding); False: padded batches (length_buckets). Models without a packed path pad, and say so.
    c.eval.packing = True
    # Embedding dimensions (Matryoshka models; mlret/eval/dims.py). dim: search (exact or ScaNN) on the first `dim`
    # components of every embedding, re-normalised when model.normalize (0: the whole embedding); the summary,
    # best_metric and the card are at this dimension. dims: also report the metrics at these dimensions from the
    # same embeddings ("auto": loss.matryoshka_dims; "": none; or "256,128,64"); dim_metrics: the summary keys of
    # the by-dimension table (those an evaluator has), also logged as "<evaluator>@<d>/<key>".
    c.eval.dim = 0
    c.eval.dims = "auto"
    c.eval.dim_metrics = "mono_map,cross_map,multi_map,multi_rank_distance,ndcg10,recall100,mrr,acc"
    c.eval.retrieval = ml_collections.ConfigDict()
    c.eval.retrieval.method = "auto"  # auto | exact | scann
    c.eval.retrieval.scann_threshold = 1_000_000  # auto: exact search up to this many candidates, ScaNN above
    c.eval.retrieval.num_leaves = 0  # ScaNN tree leaves; 0: about sqrt(pool size)
    # 0: from the pool size: leaves holding on average 4x the reordered candidates, at least a tenth of them
    c.eval.retrieval.leaves_to_search = 0
    c.eval.retrieval.reorder = 0  # exactly re-scored candidates; 0: max(200, 10 k)
    c.eval.retrieval.reorder_dtype = "float32"  # ScaNN's re-scoring copy: float32 | bfloat16 | int8 (less memory)
    c.eval.retrieval.spherical = "auto"  # spherical k-means tree: auto (for unit-vector embeddings) | true | false
    # One index per candidate language, each searched and merged: a tree over a multilingual pool has leaves that
    # follow the language, so searching a few leaves drops the other languages (docs/benchmarks.md).
    c.eval.retrieval.per_language_index = False
    # LAReQA / TyDi QA (language pool): rank through the index's top rank_k instead of the exact full ranking
    # (metrics of the truncated ranking). MIRACL / Mr. TyDi always search (their runs are top k by definition).
    c.eval.retrieval.rank_with_index = False
    c.eval.retrieval.rank_k = 100
    c.eval.retrieval.training_sample_size = 250_000
    # A lower measured recall against exact search (overall or in a language) is a warning and, by on_low_recall,
    # a search done again exactly ("exact") or an error that stops the evaluation ("fail").
    c.eval.retrieval.recall_floor = 0.95
    c.eval.retrieval.on_low_recall = "exact"
    c.eval.retrieval.corpus_dtype = "float32"  # corpus embeddings kept per host: float32 | bfloat16 | float16
    c.eval.retrieval.recall_sample = 1000  # queries on which ScaNN recall@k against exact search is logged
    # One section per registered evaluator (mlret.eval.registry), each with its own module's defaults.
    for name, section in eval_registry.sections().items():
        c.eval[name] = section

    c.export = ml_collections.ConfigDict()
    # Non-empty: at the end of training mlret.train prints the last evaluation's table and writes a Hugging Face +
    # sentence-transformers folder here (mlret.export; relative paths are under the workdir), results in its card.
    c.export.dir = ""
    # The command line that trained the run (mlret.train sets it; the model card quotes it).
    c.export.command = ""

    c.lock()
    return c


def validate(config: ml_collections.ConfigDict, *, devices: int | None = None, processes: int | None = None) -> None:
    """The one check of a config before any device work; raises ConfigError naming the field.

    Every section validates its own fields, once: model, data and its sources (`mlret.data.sources`), loss,
    optim, train, checkpoint, eval and each evaluator (`mlret.eval`). Without `devices` nothing but the fields is
    read. With `devices` (and `processes`, default 1) the config is also checked as a run on that hardware: the
    mesh and the batch split (`mlret.parallel.validate_mesh`), gradient-cache chunks against the data-parallel
    size, a best-checkpoint metric that periodic evaluation reports, the lengths against the model's own
    config.json when it is on this machine, and the local data files the run reads (`mlret.preflight`), so a
    run fails here rather than after its model has loaded or compiled.
    """
    _validate_model(config.model)
    validate_data(config)
    losses.validate(config.loss)
    _validate_optim(config)
    _validate_train(config)
    _validate_checkpoint(config.checkpoint)
    _check(config.storage.request_timeout_s > 0, "storage.request_timeout_s",
           f"{config.storage.request_timeout_s} must be > 0")
    _check(config.storage.op_timeout_s > config.storage.request_timeout_s, "storage.op_timeout_s",
           f"{config.storage.op_timeout_s} must exceed storage.request_timeout_s ({config.storage.request_timeout_s})")
    _check(int(config.runtime.peer_timeout_s) == config.runtime.peer_timeout_s and config.runtime.peer_timeout_s >= 2,
           "runtime.peer_timeout_s", f"{config.runtime.peer_timeout_s} must be a whole number of seconds >= 2")
    validate_eval_config(config)
    if devices is not None:
        _validate_run(config, devices, 1 if processes is None else processes)


def _check(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {why}")


def _validate_model(m: ml_collections.ConfigDict) -> None:
    _check(m.pooling in ("cls", "mean", "pooler", "last"), "model.pooling",
           f"{m.pooling!r} is not one of cls, mean, pooler, last")
    _check(m.include_prompt or m.pooling in ("mean", "last"), "model.include_prompt",
           f"False needs pooling mean or last, not {m.pooling!r}")
    _check(m.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype",
           f"{m.compute_dtype!r} is not float32 or bfloat16")
    _check(m.attention in ("auto", "xla", "cudnn"), "model.attention", f"{m.attention!r} is not auto, xla or cudnn")


def _validate_optim(config: ml_collections.ConfigDict) -> None:
    o = config.optim
    _check(o.max_nonfinite_in_row >= 1, "optim.max_nonfinite_in_row", "must be >= 1")
    _check(o.warmup_steps <= config.train.steps, "optim.warmup_steps",
           f"{o.warmup_steps} > config.train.steps {config.train.steps}")


def _validate_train(config: ml_collections.ConfigDict) -> None:
    t = config.train
    _check(t.steps > 0, "train.steps", "must be positive")
    _check(t.log_level in ("warning", "info", "debug"), "train.log_level",
           f"{t.log_level!r} is not warning, info or debug")
    _check(t.log_every >= 1, "train.log_every", f"{t.log_every} must be >= 1")
    _check(t.trim_host_memory_every >= 0, "train.trim_host_memory_every", "must be >= 0 (0: off)")
    _check(t.grad_cache_chunk >= 0, "train.grad_cache_chunk", "must be >= 0 (0: no gradient caching)")
    if t.grad_cache_chunk and config.data.global_batch % t.grad_cache_chunk:
        raise GradCacheError(f"config.train.grad_cache_chunk={t.grad_cache_chunk} does not divide "
                             f"config.data.global_batch={config.data.global_batch}; use a divisor of the global batch")


def _validate_checkpoint(ck: ml_collections.ConfigDict) -> None:
    _check(ck.every >= 0, "checkpoint.every", f"{ck.every} must be >= 0 (0: only at the end and on SIGTERM)")
    _check(ck.keep >= 1, "checkpoint.keep", f"{ck.keep} must be >= 1")
    _check(ck.best_mode in ("max", "min"), "checkpoint.best_mode", f"{ck.best_mode!r} is not max or min")
    _check(ck.on_damaged in ("previous", "stop"), "checkpoint.on_damaged", f"{ck.on_damaged!r} is not previous or stop")
    _check(ck.sigterm_grace_s > 0, "checkpoint.sigterm_grace_s", f"{ck.sigterm_grace_s} must be > 0")


def _validate_run(config: ml_collections.ConfigDict, devices: int, processes: int) -> None:
    """What a training run on `devices` devices in `processes` processes needs beyond valid fields."""
    from mlret import parallel  # lazy: the field checks stay free of flax (mlret.parallel imports it)
    from mlret.models.encoder_config import local_max_length  # lazy: transformers after mlret.train's setup_logging

    check_storage(config)  # a gs:// path that cannot work stops the run now, within seconds
    # Missing data is reported now, with where it comes from, not after the model has loaded.
    check_data(config, evaluators=config.eval.every > 0)
    dp = parallel.validate_mesh(config, devices, processes)
    chunk = config.train.grad_cache_chunk
    if chunk % dp:
        raise GradCacheError(
            f"config.train.grad_cache_chunk={chunk} is not a multiple of the data-parallel size {dp} (mesh axes of "
            "the 'batch' rule): every device encodes chunk/data_parallel of its rows per chunk; use a multiple of "
            f"{dp}")
    _check(not config.checkpoint.best_metric or config.eval.every > 0, "checkpoint.best_metric",
           "set, but config.eval.every is 0 (no evaluation reports the metric); set eval.every > 0 or clear "
           "best_metric")
    found = local_max_length(config.model.name) if config.model.name else None
    if found is not None:
        max_len, where = found
        for field in ("query_len", "passage_len"):
            length = int(config.data[field])
            _check(length <= max_len, f"data.{field}",
                   f"{length} exceeds the model's {max_len} positions ({where}); lower it to <= {max_len}")


def load_config_module(path: str | os.PathLike[str]) -> ModuleType:
    """A config file as a module (configs/ is not a package): what `--config path` reads, by its path."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"mlret_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str | os.PathLike[str], arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(arg)`) of a config file, as `--config path[:arg]` gives it."""
    module = load_config_module(path)
    return module.get_config() if arg is None else module.get_config(arg)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Set fields from `field=value` text (`train.steps=100`, `eval.xquad_r.languages=en,de`; a leading
    `--config.` is dropped), each value parsed as the field's current type: bool from 1/true/yes (anything else
    is False), int (also from "1e3"), float, a tuple from a Python literal (`data.sources=({"name": ...},)`),
    else the string."""
    for item in overrides:
        field, sep, value = item.removeprefix("--config.").partition("=")
        if not sep:
            raise ConfigError(f"{item!r}: expected field=value")
        *parents, leaf = field.split(".")
        try:
            node = config
            for p in parents:
                node = node[p]
            current = node[leaf]
        except KeyError:
            raise ConfigError(f"config.{field}: no such config field; the schema is mlret/config.py") from None
        if isinstance(current, bool):
            node[leaf] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, (int, float)):
            try:
                node[leaf] = int(float(value)) if isinstance(current, int) else float(value)
            except ValueError:
                raise ConfigError(f"config.{field}: {value!r} is not a number (the field is "
                                  f"{type(current).__name__})") from None
        elif isinstance(current, (tuple, list)):  # e.g. data.sources: a Python literal, as mlret.train takes it
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError) as e:
                raise ConfigError(f"config.{field}: {value!r} is not a Python literal ({e})") from None
            if not isinstance(parsed, (tuple, list)):
                raise ConfigError(f"config.{field}: expected a tuple, got {type(parsed).__name__} {value!r}")
            node[leaf] = type(current)(parsed)
        else:
            node[leaf] = value


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (for checkpoints and logs)."""
    return config.to_dict()
