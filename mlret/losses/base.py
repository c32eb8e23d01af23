"""What every loss family shares: its record (`LossFamily`), the frozen spec the step runs (`LossSpec`), and the
static setup a loss is built for (`LossSetup`).

A loss family is one module with one `LossFamily` record (`mlret.losses` registers it). The record says
everything mlret needs to know of the family:

- `defaults()`: its `config.loss.<name>` section (the registry adds `weight`);
- `validate(section, ctx)`: raise `ctx.fail(field, why)` for a bad field (part of `mlret.config.validate`);
- `options(section, loss)`: the section as a frozen, hashable value (`loss` is the whole `config.loss`);
- `build(options, setup)`: the term, `term(emb, fields, temperature) -> (loss, metrics)`, a pure jax function of
  the embeddings `emb` (`{"query": [B, D], "passage": [B, G, D]}`, the names in `embeddings`) and of the batch
  fields it declares in `fields` (passed through unencoded, e.g. `unit_id`, a teacher's scores);
- `describe(options)`: the sentence the model card gives it;
- `embeddings`: the embeddings it reads, each encoded by the step from its own batch fields (gradient caching
  chunks and re-encodes exactly those); `fields`: the batch fields it reads as they are;
- `aliases`: fields of its section that an older schema had at `config.loss.<field>`; they stay reachable there
  (the same value), so older configs and checkpoints keep working.

Imports nothing heavy: the config schema and its validation read these records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from mlret.errors import ConfigError

# term(emb, fields, temperature) -> (loss, metrics): float32 scalars.
Term = Callable[[Mapping[str, Any], Mapping[str, Any], Any], tuple[Any, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What a family's `validate` sees besides its own section."""

    name: str  # the family's name (its section is config.loss.<name>)
    loss: Any  # the whole config.loss (read only)
    active: bool  # named in config.loss.terms

    def fail(self, field: str, why: str) -> ConfigError:
        """The error for a bad `config.loss.<name>.<field>` (raise it)."""
        return ConfigError(f"config.loss.{self.name}.{field}: {why}")


@dataclasses.dataclass(frozen=True)
class LossSetup:
    """Where a loss runs, fixed when the step is built: how embeddings reach every query (`gather`:
    "constraint" or "shard_map", config.loss.gather), the mesh and the mesh axes the batch is split over (None
    and (): one device, no sharding constraints)."""

    gather: str = "constraint"
    mesh: Any = None
    batch_axes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LossFamily:
    """One loss family (see the module docstring)."""

    name: str
    defaults: Callable[[], Any]
    options: Callable[[Any, Any], Any]
    build: Callable[[Any, LossSetup], Term]
    describe: Callable[[Any], str]
    validate: Callable[[Any, LossContext], None] = lambda section, ctx: None
    embeddings: tuple[str, ...] = ("query", "passage")
    fields: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """One term of the loss: a family, its weight and its frozen options."""

    name: str
    weight: float
    options: Any


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The loss of a run, frozen from a validated `config.loss` (`mlret.losses.spec`): hashable, so the step's
    jit treats it as a constant. The loss is the weighted sum of `terms` (at each Matryoshka dimension, weighted
    again); `temperature` is τ (the start value of the learnable one with `learnable_temperature`); `gather` is
    config.loss.gather."""

    terms: tuple[TermSpec, ...]
    temperature: float = 0.05
    learnable_temperature: bool = False
    gather: str = "constraint"
    # Matryoshka (Kusupati et al. 2022; sentence-transformers' MatryoshkaLoss): ((dim, weight), ...); the terms are
    # taken on the first `dim` components of every embedding (re-normalised with `matryoshka_normalize`) and
    # summed with the weights. (): the full embeddings only.
    matryoshka: tuple[tuple[int, float], ...] = ()
    matryoshka_normalize: bool = True
