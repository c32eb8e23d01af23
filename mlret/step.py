"""The train state, the optimizer and the jitted train step (docs/architecture.md; Tevatron's tiny step,
MaxText's shardings).

The model is split once with `nnx.split` into a static graphdef and its parameters; from then on the train state
is a plain pytree (a dict), so that `jax.jit` shards it with in/out shardings, donates it, and orbax saves it:

    {"params": {"model": <pure dict of nnx.Param arrays>, ["log_temperature": f32[]]},
     "opt_state": <optax state>, "step": i32[], "rng": u32[2],
     "nonfinite_in_row": i32[], "nonfinite_total": i32[]}

`rng` is the run's PRNG key (from `config.seed`), saved and restored with the rest; the encoder has no dropout, so
nothing draws from it yet. `log_temperature` exists only with `config.loss.learnable_temperature` (τ =
exp(log_temperature), trained by the same
optimizer, no weight decay). The step encodes the global batch, takes the contrastive loss with the score matrix
split on its query axis over the batch mesh axes (or under `shard_map`, `config.loss.gather`), and applies AdamW
unless the loss or the gradients are non-finite: then the update is skipped and counted (the loop stops after
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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlret import gradcache, parallel
from mlret.data import packing
from mlret.losses import LossOptions, contrastive_loss, sharded_contrastive_loss, vrn_delta

TrainState = dict[str, Any]
# Fields of the data contract the step reads (docs/architecture.md, "Data"), padded or packed
# (config.data.packing: mlret.data.packing turns the padded batch into these on the host).
BATCH_FIELDS = ("query_ids", "query_mask", "passage_ids", "passage_mask", "unit_id")
PACKED_FIELDS = ("query_ids", "query_segments", "passage_ids", "passage_segments", "unit_id")


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


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                                optax.Schedule]:
    """Global-norm clipping, then AdamW with the warm-up/decay schedule and the decay mask."""
    schedule = learning_rate_schedule(optim, total_steps)
    parts = []
    if optim.clip_norm and optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                             weight_decay=float(optim.weight_decay), mask=decay_mask))
    return optax.chain(*parts), schedule


def loss_options(loss: ml_collections.ConfigDict) -> LossOptions:
    """config.loss -> the loss variant (δ = −1/(k−1) when loss.vrn_instances = k, else loss.vrn_delta)."""
    delta = vrn_delta(int(loss.vrn_instances)) if loss.vrn_instances else float(loss.vrn_delta)
    return LossOptions(symmetric=bool(loss.symmetric), in_batch_positives=bool(loss.in_batch_positives),
                       within_view=bool(loss.within_view), vrn_weight=float(loss.vrn_weight), vrn_delta=delta,
                       vrn_power=float(loss.vrn_power))


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
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: parallel.Rules
    graphdef: Any
    rest: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
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
        rng = jax.random.key_data(jax.random.key(int(self.config.seed)))
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
        return float(self.config.loss.temperature)

    def embed(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(query embeddings [B, D], passage embeddings [B, G, D]) of (a chunk of) the batch, padded or packed."""
        model = nnx.merge(self.graphdef, params["model"], self.rest)
        if "query_segments" not in batch:
            q = model.encode_query(batch["query_ids"], batch["query_mask"])
            p = model.encode_passage(batch["passage_ids"], batch["passage_mask"])
            return q, p
        # Packed: the segments index the pairs of the chunk (the whole batch without gradient caching).
        n, g = int(self.config.train.grad_cache_chunk) or int(self.config.data.global_batch), self.group_size
        q = model.encode_query_packed(batch["query_ids"], batch["query_segments"], n)
        p = model.encode_passage_packed(batch["passage_ids"], batch["passage_segments"], n * g)
        return q, p.reshape(n, g, -1)

    @property
    def group_size(self) -> int:
        return int(self.config.data.group_size)

    def loss_fn(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        """Contrastive loss of the global batch under `params` (a pure function: jit and grad it)."""
        q, p = self.embed(params, batch)
        return self.embedding_loss(params, (q, p), batch)

    def embedding_loss(self, params: Mapping[str, Any], emb: tuple[jax.Array, jax.Array],
                       batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        """The contrastive loss of the whole batch's embeddings `emb = (q, p)`."""
        q, p = emb
        lc = self.config.loss
        kwargs = dict(temperature=self.temperature(params), options=loss_options(lc))
        axes = parallel.batch_axes(self.rules, self.mesh)
        if lc.gather == "shard_map":
            return sharded_contrastive_loss(q, p, batch["unit_id"], mesh=self.mesh, batch_axes=axes, **kwargs)
        # Queries stay where their rows are; XLA gathers the passage embeddings to every device.
        return contrastive_loss(q, p, batch["unit_id"], score_sharding=NamedSharding(self.mesh, P(axes, None)),
                                **kwargs)

    def value_and_grad(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> tuple[
            tuple[jax.Array, dict], Any]:
        """((loss, metrics), grads), by gradient caching (mlret/gradcache.py) if config.train.grad_cache_chunk > 0."""
        chunk = int(self.config.train.grad_cache_chunk)
        if chunk > 0:
            return gradcache.value_and_grad(
                self.embed, self.embedding_loss, params, batch, chunk=chunk,
                embed_fields=tuple(f for f in self.batch_shardings if f != "unit_id"), mesh=self.mesh,
                batch_axes=parallel.batch_axes(self.rules, self.mesh), grad_shardings=self.state_shardings["params"],
                pairs=batch["unit_id"].shape[0])
        return jax.value_and_grad(self.loss_fn, has_aux=True)(params, batch)

    def _train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        self.trace_count += 1  # runs at trace time only: counts compilations
        (loss, metrics), grads = self.value_and_grad(state["params"], batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Non-finite guard: keep the old params and optimizer state (optax's count too, so the schedule only
        # advances on applied updates).
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        in_row = jnp.where(finite, 0, state["nonfinite_in_row"] + 1).astype(jnp.int32)
        total = (state["nonfinite_total"] + (~finite).astype(jnp.int32)).astype(jnp.int32)
        new_state = {
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
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
        if self.config.data.packing:
            local = packing.pack_batch(local, self.packing_layout(), first_shard=self._first_shard(),
                                       global_pairs=int(self.config.data.global_batch), agree=_max_over_processes)
            self.batch_shapes.add((local["query_ids"].shape, local["passage_ids"].shape))
        return parallel.make_global_batch({k: local[k] for k in self.batch_shardings}, self.mesh, self.rules)

    @property
    def expected_traces(self) -> int:
        """How many times the step should have been traced: once per distinct batch shape (one when padded)."""
        return max(1, len(self.batch_shapes))

    def packing_layout(self) -> packing.Layout:
        chunk = int(self.config.train.grad_cache_chunk)
        return packing.Layout(shards=parallel.data_parallel_size(self.rules, self.mesh),
                              chunks=int(self.config.data.global_batch) // chunk if chunk else 1,
                              rows_multiple=int(self.config.data.packing_rows_multiple))

    def _first_shard(self) -> int:
        """The first data-parallel shard of the batch that this process's devices hold."""
        b = int(self.config.data.global_batch)
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
    rules = parallel.parse_rules(config.mesh.rules)
    graphdef, params_state, rest = split_model(model)
    replicated = NamedSharding(mesh, P())
    param_shardings: dict[str, Any] = {"model": nnx.to_pure_dict(parallel.state_shardings(params_state, mesh,
                                                                                           rules))}
    param_logical = nnx.to_pure_dict(jax.tree.map(
        parallel.variable_logical_axes, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    params: Params = {"model": nnx.to_pure_dict(params_state)}
    if config.loss.learnable_temperature:
        params["log_temperature"] = jnp.log(jnp.float32(config.loss.temperature))
        param_shardings["log_temperature"] = replicated
    abstract_params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh), params,
                                   param_shardings)
    parallel.check_param_sharding(abstract_params["model"], param_logical, mesh, rules,
                                  int(config.mesh.replicated_param_threshold))
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params),
                                          param_shardings, transform_non_params=lambda _: replicated)
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated,
                       "rng": replicated, "nonfinite_in_row": replicated, "nonfinite_total": replicated}
    batch_sharding = NamedSharding(mesh, parallel.batch_spec(rules, mesh))
    fields = PACKED_FIELDS if config.data.packing else BATCH_FIELDS
    trainer = Trainer(config=config, mesh=mesh, rules=rules, graphdef=graphdef, rest=jax.device_put(rest, replicated),
                      tx=tx, schedule=schedule, state_shardings=state_shardings,
                      batch_shardings={k: batch_sharding for k in fields}, param_logical=param_logical,
                      abstract_params=abstract_params)
    return trainer, jax.device_put(params, param_shardings)


def _max_over_processes(x: np.ndarray) -> np.ndarray:
    """Elementwise max of `x` over the processes (a small host collective; the identity in one process)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).max(axis=0)
