"""The loss families mlret knows, by name: one `LossFamily` record each (`mlret.losses.base`), and the loss of a
run built from them.

`config.loss.terms` names the families a run trains with (comma-separated); the loss is their sum, each weighted
by its section's `weight` (`config.loss.<name>.weight`, default 1). The registry drives everything that depends
on the set of families: the `config.loss.<name>` sections of the schema (`add_sections`, used by
`mlret.config.default_config`), their validation (`validate`, part of `mlret.config.validate`), the frozen
`LossSpec` the step runs (`spec`), the embeddings and batch fields the step hands the loss (`embeddings`,
`fields`), the loss function itself (`build`) and the model card's sentence (`describe`). Matryoshka dimensions
(`config.loss.matryoshka_dims`) wrap whatever the terms are: `build` sums them again on each embedding prefix.

A new family is one module that exports `LOSS = LossFamily(...)` (or several: `LOSSES = (...)`, as
`distill.py`'s margin_mse and kl_distill) plus its line in `_BUILTIN` below; code outside
mlret (a test, a config file) calls `register(family)` before `default_config()`. docs/architecture.md, "Adding a
loss", walks through one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from mlret.errors import ConfigError
from mlret.losses import contrastive, distill, embed_distill
from mlret.losses.base import LossContext, LossFamily, LossSetup, LossSpec, Term, TermSpec
from mlret.losses.contrastive import LossOptions, contrastive_loss, sharded_contrastive_loss, vrn_delta
from mlret.registry import Registry

__all__ = ["LossContext", "LossFamily", "LossOptions", "LossSetup", "LossSpec", "Term", "TermSpec", "add_sections",
           "build", "contrastive_loss", "describe", "embeddings", "fields", "get", "names", "parse_matryoshka",
           "register", "sections", "sharded_contrastive_loss", "spec", "unregister", "validate", "vrn_delta"]

GATHERS = ("constraint", "shard_map")

_REGISTRY: Registry[LossFamily] = Registry("loss family")
# Add a family (a name may be registered once); `default_config()` called afterwards has its section.
register = _REGISTRY.register


def unregister(name: str) -> None:
    """Remove a registered family (a test's or a plugin's own)."""
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered families' names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> LossFamily:
    if name not in _REGISTRY:
        raise ConfigError(f"config.loss.terms: {name!r} is not a registered loss family ({', '.join(_REGISTRY)}); "
                          "register it (mlret.losses.register) before default_config()")
    return _REGISTRY[name]


_BUILTIN = (contrastive, distill, embed_distill)  # one line per loss family module
for _module in _BUILTIN:
    for _family in getattr(_module, "LOSSES", None) or (_module.LOSS,):  # LOSSES: a module of several families
        register(_family)


def parse_terms(value: str) -> list[str]:
    """config.loss.terms ("contrastive" or "contrastive,other") -> the names, in order."""
    return [v.strip() for v in str(value).split(",") if v.strip()]


def sections() -> dict[str, ml_collections.ConfigDict]:
    """{name: its config.loss section with the defaults} for every registered family; each has a `weight`."""
    out = {}
    for name, family in _REGISTRY.items():
        section = family.defaults()
        if "weight" not in section:
            section.weight = 1.0  # the term's weight in the sum of config.loss.terms
        out[name] = section
    return out


def add_sections(loss: ml_collections.ConfigDict) -> None:
    """Put every registered family's section into the schema's `config.loss`, and each family's `aliases` at
    `config.loss.<field>` as references to the section's field (one value under two names)."""
    for name, section in sections().items():
        loss[name] = section
        for field in _REGISTRY[name].aliases:
            loss[field] = section.get_ref(field)


def parse_matryoshka(loss: Any) -> tuple[tuple[int, float], ...]:
    """config.loss.matryoshka_dims / matryoshka_weights -> ((dim, weight), ...); raises ConfigError naming the
    field."""
    try:
        dims = [int(x) for x in parse_terms(loss.matryoshka_dims)]
    except ValueError:
        raise ConfigError(f"config.loss.matryoshka_dims: {loss.matryoshka_dims!r} is not a comma-separated list of "
                          "whole numbers (e.g. \"384,256,128,64\")") from None
    try:
        weights = [float(x) for x in parse_terms(loss.matryoshka_weights)] or [1.0] * len(dims)
    except ValueError:
        raise ConfigError(f"config.loss.matryoshka_weights: {loss.matryoshka_weights!r} is not a comma-separated "
                          "list of numbers") from None
    _check(all(d > 0 for d in dims) and len(set(dims)) == len(dims), "matryoshka_dims",
           f"{loss.matryoshka_dims!r} must be distinct positive dimensions")
    _check(len(weights) == len(dims), "matryoshka_weights",
           f"{len(weights)} weight(s) for {len(dims)} dimension(s) in config.loss.matryoshka_dims; give one per "
           "dimension, or none (all 1)")
    _check(all(math.isfinite(w) and w > 0 for w in weights), "matryoshka_weights",
           f"{loss.matryoshka_weights!r} must be positive numbers")
    return tuple(zip(dims, weights, strict=True))


def validate(loss: Any) -> None:
    """Check config.loss: the loss-wide fields, the terms, and every registered family's section."""
    _check(loss.temperature > 0, "temperature", "must be positive")
    _check(loss.gather in GATHERS, "gather", f"{loss.gather!r} is not one of {', '.join(GATHERS)}")
    parse_matryoshka(loss)
    terms = parse_terms(loss.terms)
    _check(bool(terms), "terms", "empty; name at least one loss family (e.g. contrastive)")
    _check(len(set(terms)) == len(terms), "terms", f"{loss.terms!r} names a family twice")
    for name in terms:
        get(name)
    for name, family in _REGISTRY.items():
        if name not in loss:
            raise ConfigError(f"config.loss.{name}: no such section; register the loss family before "
                              "default_config()")
        section = loss[name]
        ctx = LossContext(name, loss, name in terms)
        weight = section.weight
        if ctx.active and not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ctx.fail("weight", f"{weight!r} must be a positive number (drop the term from config.loss.terms "
                                     "to switch it off)")
        family.validate(section, ctx)


def _check(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config.loss.{field}: {why}")


def spec(loss: Any) -> LossSpec:
    """The frozen loss of a validated config.loss."""
    terms = tuple(TermSpec(name, float(loss[name].weight), get(name).options(loss[name], loss))
                  for name in parse_terms(loss.terms))
    return LossSpec(terms=terms, temperature=float(loss.temperature),
                    learnable_temperature=bool(loss.learnable_temperature), gather=str(loss.gather),
                    matryoshka=parse_matryoshka(loss), matryoshka_normalize=bool(loss.matryoshka_normalize))


def embeddings(loss: LossSpec) -> tuple[str, ...]:
    """The embeddings the loss reads (the step encodes these), in first-use order."""
    return tuple(dict.fromkeys(e for t in loss.terms for e in _REGISTRY[t.name].embeddings))


def fields(loss: LossSpec) -> tuple[str, ...]:
    """The batch fields the loss reads as they are (the step passes these through), in first-use order."""
    return tuple(dict.fromkeys(f for t in loss.terms for f in _REGISTRY[t.name].fields))


LossFn = Callable[[Mapping[str, Any], Mapping[str, Any], Any], tuple[Any, dict[str, Any]]]


def build(loss: LossSpec, setup: LossSetup) -> LossFn:
    """loss_fn(emb, fields, temperature) -> (loss, metrics): the weighted sum of the terms, each given exactly the
    embeddings and fields its family declares.

    Metrics: one term (weight 1) returns its own metrics unchanged. Several: `loss` is the weighted sum,
    `loss_<name>` each term's unweighted loss, and every other metric keeps its name unless an earlier term has
    it, then it is `<name>/<metric>`. With Matryoshka dimensions the sum is taken at each (`loss_dim<d>`, the
    unweighted sum at dimension d; `loss`, their weighted sum) and the other metrics are the first dimension's."""
    built = [(t, _REGISTRY[t.name], _REGISTRY[t.name].build(t.options, setup)) for t in loss.terms]

    def terms(emb: Mapping[str, Any], batch_fields: Mapping[str, Any], temperature: Any) -> tuple[Any, dict]:
        total, metrics = None, {}
        for t, family, term in built:
            value, m = term({e: emb[e] for e in family.embeddings}, {f: batch_fields[f] for f in family.fields},
                            temperature)
            if len(built) == 1 and t.weight == 1.0:
                return value, m
            total = t.weight * value if total is None else total + t.weight * value
            metrics[f"loss_{t.name}"] = value
            for k, v in m.items():
                if k != "loss":
                    metrics[k if k not in metrics else f"{t.name}/{k}"] = v
        metrics["loss"] = total
        return total, metrics

    if not loss.matryoshka:
        return terms

    def matryoshka(emb: Mapping[str, Any], batch_fields: Mapping[str, Any], temperature: Any) -> tuple[Any, dict]:
        total, metrics = None, {}
        for i, (dim, weight) in enumerate(loss.matryoshka):
            value, m = terms({k: _prefix(v, dim, loss.matryoshka_normalize) for k, v in emb.items()}, batch_fields,
                             temperature)
            total = weight * value if total is None else total + weight * value
            if i == 0:
                metrics.update(m)
            metrics[f"loss_dim{dim}"] = value
        metrics["loss"] = total
        return total, metrics

    return matryoshka


def _prefix(x: Any, dim: int, normalize: bool) -> Any:
    """The first `dim` components of embeddings `x` [..., D] (L2-normalised again with `normalize`), in float32."""
    if dim > x.shape[-1]:
        raise ConfigError(f"config.loss.matryoshka_dims: {dim} exceeds the embedding size {x.shape[-1]}")
    y = x[..., :dim].astype(jnp.float32)
    return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12) if normalize else y


def describe(loss: LossSpec) -> str:
    """The model card's sentence for the loss: each term's own, with its weight when there are several."""
    parts = [_REGISTRY[t.name].describe(t.options) for t in loss.terms]
    if len(parts) > 1 or loss.terms[0].weight != 1.0:
        parts = [f"{t.weight:g} x {p}" for t, p in zip(loss.terms, parts, strict=True)]
    tau = f"temperature {loss.temperature:g}" + (" (learnable)" if loss.learnable_temperature else "")
    out = " + ".join(parts) + f"; {tau}"
    if loss.matryoshka:
        dims = ", ".join(f"{d}" + (f" (x{w:g})" if w != 1.0 else "") for d, w in loss.matryoshka)
        out += (f"; Matryoshka: at the first {dims} dimensions of every embedding"
                + (", each prefix L2-normalised" if loss.matryoshka_normalize else ""))
    return out
