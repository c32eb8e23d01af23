"""The train state, the optimizer and the jitted train step (docs/architecture.md; Tevatron's tiny step,
MaxText's shardings).

The model is split once with `nnx.split` into a static graphdef and its parameters; from then on the train state
is a plain pytree (a dict), so that `jax.jit` shards it with in/out shardings, donates it, and orbax saves it:

    {"params": {"model": <pure dict of nnx.Param arrays>, ["log_temperature": f32[]]},
     "opt_state": <optax state>, "step": i32[], "rng": u32[2],
     "nonfinite_in_row": i32[], "nonfinite_total": i32[]}

`rng` is the run's PRNG key (from `config.seed`), saved and restored with the rest; the encoder has no dropout, so
nothing draws from it yet. `log_temperature` exists only with `config.loss.learnable_temperature` (τ =
exp(log_temperature), trained by the same optimizer, no weight decay).

The step reads no config: `build_train_step` freezes what it needs into a `StepSpec` once (`step_spec(config)`,
with the loss as an `mlret.losses.LossSpec`). It encodes the embeddings the loss declares (each from its own
batch fields, padded or packed), hands the loss exactly the batch fields it declares, and applies AdamW unless
the loss or the gradients are non-finite: then the update is skipped and counted (the loop stops after
`config.optim.max_nonfinite_in_row` in a row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlret import gradcache, losses, parallel
from mlret.data import packing
from mlret.errors import ConfigError
from mlret.models import common

TrainState = dict[str, Any]
# The embeddings the step makes for a loss (a loss family's `embeddings`) and the batch fields each is encoded
# from, padded or packed (config.data.packing: mlret.data.packing turns the padded batch into these on the host);
# docs/architecture.md, "Data". Gradient caching chunks and re-encodes exactly these fields.
ENCODED_FIELDS = {"query": ("query_ids", "query_mask"), "passage": ("passage_ids", "passage_mask")}
PACKED_ENCODED_FIELDS = {"query": ("query_ids", "query_segments"), "passage": ("passage_ids", "passage_segments")}


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the train step needs of a validated config, read once (`step_spec`); hashable."""

    seed: int
    global_batch: int  # pairs per global batch
    group_size: int  # G: passages per pair
    grad_cache_chunk: int  # pairs encoded at once (0: the whole batch, no gradient caching)
    packing: bool
    packing_rows_multiple: int
    loss: losses.LossSpec

    @property
    def embeddings(self) -> tuple[str, ...]:
        """The embeddings the loss reads."""
        return losses.embeddings(self.loss)

    @property
    def encode_fields(self) -> tuple[str, ...]:
        """The batch fields the step encodes (those of the loss's embeddings)."""
        table = PACKED_ENCODED_FIELDS if self.packing else ENCODED_FIELDS
        return tuple(f for e in self.embeddings for f in table[e])

    @property
    def pass_fields(self) -> tuple[str, ...]:
        """The batch fields the loss reads as they are."""
        return losses.fields(self.loss)

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """Every batch field the step reads: encoded, then passed through."""
        return tuple(dict.fromkeys(self.encode_fields + self.pass_fields))


def step_spec(config: ml_collections.ConfigDict) -> StepSpec:
    """The step's frozen view of a validated config."""
    loss = losses.spec(config.loss)
    unknown = [e for e in losses.embeddings(loss) if e not in ENCODED_FIELDS]
    if unknown:
        raise ConfigError(f"config.loss.terms: {config.loss.terms!r} reads the embedding(s) {', '.join(unknown)}, "
                          f"which the train step does not make (it makes {', '.join(ENCODED_FIELDS)}: "
                          "mlret.step.ENCODED_FIELDS)")
    return StepSpec(seed=int(config.seed), global_batch=int(config.data.global_batch),
                    group_size=int(config.data.group_size), grad_cache_chunk=int(config.train.grad_cache_chunk),
                    packing=bool(config.data.packing), packing_rows_multiple=int(config.data.packing_rows_multiple),
                    loss=loss)


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then linear decay to
    `end_learning_rate_factor * learning_rate` at `total_steps`."""
    peak = float(optim.learning_rate)
    warmup = max(int(optim.warmup_steps), 0)
    end = peak * float(optim.end_learning_rate_factor)
    decay = optax.linear_schedule(peak, end, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: weight matrices and embedding tables only, never LayerNorm scales/biases,
    biases or the temperature (the usual BERT fine-tuning recipe, as in HF's `no_decay`)."""

    def one(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return name in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> tuple[
        optax.GradientTransformation, optax.Schedule, optax.GradientTransformation | None,
        optax.GradientTransformation]:
    """Global-norm clipping, then AdamW with the warm-up/decay schedule and the decay mask: (the chain, its
    schedule, its clipping part or None without `optim.clip_norm`, the rest of the chain with the chain's state
    structure). The train step clips before its non-finite guard and applies the rest under it."""
    schedule = learning_rate_schedule(optim, total_steps)
    adamw = optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                        weight_decay=float(optim.weight_decay), mask=decay_mask)
    if not (optim.clip_norm and optim.clip_norm > 0):
        return optax.chain(adamw), schedule, None, optax.chain(adamw)
    clip = optax.clip_by_global_norm(float(optim.clip_norm))
    # The chain's state is (clip's empty state, AdamW's): identity's empty state keeps that structure for the rest.
    return optax.chain(clip, adamw), schedule, clip, optax.chain(optax.identity(), adamw)


def split_model(model: nnx.Module) -> tuple[Any, Any, Any]:
    """(graphdef, params as nnx.State of Variables, everything else). The Variables keep their logical axes."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


Params = dict[str, Any]


@dataclasses.dataclass
class Trainer:
    """Everything static about a run's step: graphdef, optimizer, mesh, shardings, and the jitted step.

    Made by `build_train_step`. It holds no weights: `init_state(params)` turns the loaded weights into a fresh
    state on the mesh, `step(state, batch)` runs one update, `abstract_state()` describes the state for orbax.
    It reads no config: `spec` is what it needs of it, `loss` the loss function built from `spec.loss` for the
    mesh (`mlret.losses.build`).
    """

    spec: StepSpec
    loss: losses.LossFn
    mesh: Mesh
    rules: parallel.Rules
    graphdef: Any
    rest: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    clip: optax.GradientTransformation | None  # tx's first part, applied before the non-finite guard
    after_clip: optax.GradientTransformation  # the rest of tx, with tx's state: applied under the guard
    state_shardings: TrainState
    batch_shardings: dict[str, NamedSharding]
    param_logical: Any
    abstract_params: Params  # ShapeDtypeStructs (with shardings) of the trained parameters
    trace_count: int = 0
    batch_shapes: set = dataclasses.field(default_factory=set)  # distinct packed shapes seen by global_batch
    _step: Callable[..., Any] | None = None
    _grad: Callable[..., Any] | None = None

    def init_state(self, params: Params) -> TrainState:
        """A fresh state (step 0) on the mesh around `params` (as `build_train_step` returned them).

        The state takes the arrays over without a copy and the step donates its input state, so `params` must
        not be used afterwards: pass a copy (`jax.tree.map(jnp.copy, params)`) to start twice from them."""
        params = jax.device_put(params, self.state_shardings["params"])
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        rng = jax.random.key_data(jax.random.key(self.spec.seed))
        scalars = {"step": jnp.int32(0), "rng": rng, "nonfinite_in_row": jnp.int32(0),
                   "nonfinite_total": jnp.int32(0)}
        scalars = jax.device_put(scalars, {k: self.state_shardings[k] for k in scalars})
        return {"params": params, "opt_state": opt_state, **scalars}

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for orbax."""
        shapes = jax.eval_shape(self.init_state, self.abstract_params)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    # ----------------------------------------------------------------------------------------------- the math

    def temperature(self, params: Mapping[str, Any]) -> jax.Array | float:
        if "log_temperature" in params:
            return jnp.exp(params["log_temperature"])
        return self.spec.loss.temperature

    def embed(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The embeddings the loss reads, of (a chunk of) the batch, padded or packed: `query` [B, D] and
        `passage` [B, G, D]. Reads only `spec.encode_fields`. The encoders pin their hidden states to the batch
        sharding (`parallel.activation_sharding`), so that with mesh.fsdp > 1 XLA gathers weights, not activations."""
        with parallel.activation_sharding(self.mesh, self.rules):
            return self._embed(params, batch)

    def _embed(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        model = nnx.merge(self.graphdef, params["model"], self.rest)
        wanted = self.spec.embeddings
        out = {}
        if not self.spec.packing:
            if "query" in wanted:
                out["query"] = model.encode_query(batch["query_ids"], batch["query_mask"])
            if "passage" in wanted:
                out["passage"] = model.encode_passage(batch["passage_ids"], batch["passage_mask"])
            return out
        # Packed: the segments index the pairs of the chunk (the whole batch without gradient caching), and each
        # data-parallel shard's rows hold its own pairs (mlret.data.packing), so each shard pools on its own.
        n, g = self.spec.grad_cache_chunk or self.spec.global_batch, self.spec.group_size
        # The pooled [texts, D] rows are pinned to the batch sharding, as padded rows are: the loss then gathers
        # that one array (else XLA gathered the per-shard [1, texts, D] blocks, then again in the backward).
        shards = parallel.data_parallel_size(self.rules, self.mesh)
        rows = NamedSharding(self.mesh, parallel.batch_spec(self.rules, self.mesh))
        if "query" in wanted:
            out["query"] = jax.lax.with_sharding_constraint(
                model.encode_query_packed(batch["query_ids"], batch["query_segments"], n, shards), rows)
        if "passage" in wanted:
            p = jax.lax.with_sharding_constraint(
                model.encode_passage_packed(batch["passage_ids"], batch["passage_segments"], n * g, shards), rows)
            out["passage"] = p.reshape(n, g, -1)
        return out

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    def loss_fn(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        """The loss of the global batch under `params` (a pure function: jit and grad it)."""
        return self.embedding_loss(params, self.embed(params, batch), batch)

    def embedding_loss(self, params: Mapping[str, Any], emb: Mapping[str, jax.Array],
                       batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        """The loss of the whole batch's embeddings `emb` (`embed`'s), given the batch fields it declares."""
        return self.loss(emb, {f: batch[f] for f in self.spec.pass_fields}, self.temperature(params))

    def value_and_grad(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> tuple[
            tuple[jax.Array, dict], Any]:
        """((loss, metrics), grads), by gradient caching (mlret/gradcache.py) if config.train.grad_cache_chunk > 0:
        only the encoded fields are chunked, the loss gets the whole batch's passed-through fields."""
        chunk = self.spec.grad_cache_chunk
        if chunk > 0:
            return gradcache.value_and_grad(
                self.embed, self.embedding_loss, params, batch, chunk=chunk, embed_fields=self.spec.encode_fields,
                mesh=self.mesh, batch_axes=parallel.batch_axes(self.rules, self.mesh),
                grad_shardings=self.state_shardings["params"],
                pairs=self.spec.global_batch if self.spec.packing else None)  # padded: the rows of the batch
        return common.value_and_grad_deferring_lookups(self.loss_fn, params, batch)

    def _train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        self.trace_count += 1  # runs at trace time only: counts compilations
        (loss, metrics), grads = self.value_and_grad(state["params"], batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if self.clip is not None:
            # Clipped here, not inside the guard's cond: there, the clipped gradients (optax divides them by the
            # norm, and XLA keeps a division's result in its own buffer) were a temporary as large as the
            # gradients, which the cond keeps alive as its operand (a vocabulary table: 0.36 GiB for e5-small).
            grads, _ = self.clip.update(grads, optax.EmptyState())

        def update(args: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            grads, opt_state, params = args
            updates, opt_state = self.after_clip.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # Non-finite guard: keep the old params and optimizer state (optax's count too, so the schedule only
        # advances on applied updates). A cond, not a `where` between the new and the old trees: the `where` kept
        # the new weights and moments alive beside the donated old ones (the demo's step: 1.83 GiB of temporaries
        # with it, 1.48 with the cond, as without a guard; docs/benchmarks.md, "The first hour").
        params, opt_state = jax.lax.cond(finite, update, lambda args: (args[2], args[1]),
                                         (grads, state["opt_state"], state["params"]))
        in_row = jnp.where(finite, 0, state["nonfinite_in_row"] + 1).astype(jnp.int32)
        total = (state["nonfinite_total"] + (~finite).astype(jnp.int32)).astype(jnp.int32)
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
            "nonfinite_in_row": in_row,
            "nonfinite_total": total,
        }
        metrics = dict(metrics, grad_norm=grad_norm, finite=finite, nonfinite_in_row=in_row, nonfinite_total=total,
                       learning_rate=self.schedule(state["step"] - state["nonfinite_total"]))
        return new_state, metrics

    # ----------------------------------------------------------------------------------------------- jitted

    @property
    def step(self) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
        """The jitted step: state donated, in/out shardings fixed; metrics replicated."""
        if self._step is None:
            replicated = NamedSharding(self.mesh, P())
            self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_shardings),
                                 out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
        return self._step

    def grad_fn(self) -> Callable[..., Any]:
        """jit(value_and_grad(loss_fn)) with the step's shardings (for equivalence tests and gradient checks)."""
        if self._grad is None:
            replicated = NamedSharding(self.mesh, P())
            self._grad = jax.jit(self.value_and_grad,
                                 in_shardings=(self.state_shardings["params"], self.batch_shardings),
                                 out_shardings=((replicated, replicated), self.state_shardings["params"]))
        return self._grad

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's slice of the batch -> global arrays (only the fields the step reads), packed on the
        host first with config.data.packing (mlret.data.packing: one piece per shard and gradient-cache chunk)."""
        if self.spec.packing:
            local = packing.pack_batch(local, self.packing_layout(), first_shard=self._first_shard(),
                                       global_pairs=self.spec.global_batch, agree=_max_over_processes)
            self.batch_shapes.add((local["query_ids"].shape, local["passage_ids"].shape))
        missing = [k for k in self.batch_shardings if k not in local]
        if missing:
            raise KeyError(f"the batch has no field(s) {', '.join(missing)}, which the loss ({self.spec.loss.terms}) "
                           f"reads; it has {', '.join(local)}")
        return parallel.make_global_batch({k: local[k] for k in self.batch_shardings}, self.mesh, self.rules)

    @property
    def expected_traces(self) -> int:
        """How many times the step should have been traced: once per distinct batch shape (one when padded)."""
        return max(1, len(self.batch_shapes))

    def packing_layout(self) -> packing.Layout:
        chunk = self.spec.grad_cache_chunk
        return packing.Layout(shards=parallel.data_parallel_size(self.rules, self.mesh),
                              chunks=self.spec.global_batch // chunk if chunk else 1,
                              rows_multiple=self.spec.packing_rows_multiple)

    def _first_shard(self) -> int:
        """The first data-parallel shard of the batch that this process's devices hold."""
        b = self.spec.global_batch
        sharding = NamedSharding(self.mesh, parallel.batch_spec(self.rules, self.mesh))
        first_row = min(idx[0].start or 0 for idx in sharding.addressable_devices_indices_map((b,)).values())
        return first_row // (b // parallel.data_parallel_size(self.rules, self.mesh))


def build_train_step(model: nnx.Module, config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Trainer, Params]:
    """Split `model`, fix the shardings of the state and the batch by `config.mesh.rules`, build AdamW and the
    jitted step: returns (trainer, params), the model's weights placed on the mesh (plus `log_temperature` with
    `config.loss.learnable_temperature`), for `trainer.init_state(params)`; a run that restores a checkpoint
    drops them. The trainer keeps no reference to them, so a run holds one copy of its weights: the state's.

    Raises `parallel.ShardingError` when a large weight would end up replicated although the rules shard it.
    """
    spec = step_spec(config)
    rules = parallel.parse_rules(config.mesh.rules)
    graphdef, params_state, rest = split_model(model)
    replicated = NamedSharding(mesh, P())
    param_shardings: dict[str, Any] = {"model": nnx.to_pure_dict(parallel.state_shardings(params_state, mesh,
                                                                                           rules))}
    param_logical = nnx.to_pure_dict(jax.tree.map(
        parallel.variable_logical_axes, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    params: Params = {"model": nnx.to_pure_dict(params_state)}
    if spec.loss.learnable_temperature:
        params["log_temperature"] = jnp.log(jnp.float32(spec.loss.temperature))
        param_shardings["log_temperature"] = replicated
    abstract_params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh), params,
                                   param_shardings)
    parallel.check_param_sharding(abstract_params["model"], param_logical, mesh, rules,
                                  int(config.mesh.replicated_param_threshold))
    tx, schedule, clip, after_clip = make_optimizer(config.optim, int(config.train.steps))
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params),
                                          param_shardings, transform_non_params=lambda _: replicated)
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated,
                       "rng": replicated, "nonfinite_in_row": replicated, "nonfinite_total": replicated}
    batch_sharding = NamedSharding(mesh, parallel.batch_spec(rules, mesh))
    setup = losses.LossSetup(gather=spec.loss.gather, mesh=mesh, batch_axes=parallel.batch_axes(rules, mesh))
    trainer = Trainer(spec=spec, loss=losses.build(spec.loss, setup), mesh=mesh, rules=rules, graphdef=graphdef,
                      rest=jax.device_put(rest, replicated), tx=tx, schedule=schedule, clip=clip,
                      after_clip=after_clip,
                      state_shardings=state_shardings, batch_shardings={k: batch_sharding for k in spec.batch_fields},
                      param_logical=param_logical, abstract_params=abstract_params)
    return trainer, jax.device_put(params, param_shardings)


def _max_over_processes(x: np.ndarray) -> np.ndarray:
    """Elementwise max of `x` over the processes (a small host collective; the identity in one process)."""
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x)).max(axis=0)
