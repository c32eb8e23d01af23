"""The evaluators mlret knows, by name: one `EvaluatorSpec` record each (`mlret.eval.base`).

The registry drives everything that depends on the set of evaluators: the `config.eval.<name>` sections of the
schema (`sections`, used by `mlret.config.default_config`), their validation (`validate`, part of
`mlret.config.validate`), building the configured evaluators (`build`) and the pre-flight's list of local files
(`mlret.preflight`). A new benchmark is one module that exports `EVALUATORS = (EvaluatorSpec(...), ...)` plus its
line in `_BUILTIN` below; code outside mlret (a test, a config file, a plugin) calls `register(spec)` before
`default_config()`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from mlret.errors import ConfigError
from mlret.eval import lareqa, tatoeba, trec, tydiqa
from mlret.eval.base import EvalContext, Evaluator, EvaluatorSpec, parse_list
from mlret.registry import Registry

_REGISTRY: Registry[EvaluatorSpec] = Registry("evaluator")
# Add an evaluator (a name may be registered once); `default_config()` called afterwards has its section.
register = _REGISTRY.register


def unregister(name: str) -> None:
    """Remove a registered evaluator (a test's or a plugin's own; `default_config()` no longer has its section)."""
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered evaluators' names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> EvaluatorSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"config.eval.evaluators: {name!r} is not one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


_BUILTIN = (lareqa, trec, tydiqa, tatoeba)  # one line per evaluator module
for _module in _BUILTIN:
    for _spec in _module.EVALUATORS:
        register(_spec)


def sections() -> dict[str, ml_collections.ConfigDict]:
    """{name: its config.eval section with the defaults} for every registered evaluator."""
    return {name: spec.defaults() for name, spec in _REGISTRY.items()}


def context(config: Any, name: str) -> EvalContext:
    """The context an evaluator's `validate` and `build` get."""
    spec = _REGISTRY[name]
    section = config.eval[name]
    data_dir = ""
    if spec.data_subdir:
        data_dir = section.data_dir or (os.path.join(config.data.data_dir, spec.data_subdir)
                                        if config.data.data_dir else "")
    return EvalContext(name, config, name in parse_list(config.eval.evaluators), data_dir)


def validate(config: Any) -> None:
    """Check every registered evaluator's section, and that each one named in config.eval.evaluators exists."""
    for name in parse_list(config.eval.evaluators):
        get(name)
    for name, spec in _REGISTRY.items():
        if name not in config.eval:
            raise ConfigError(f"config.eval.{name}: no such section; register the evaluator before default_config()")
        spec.validate(config.eval[name], context(config, name))


def build(config: Any, names: Sequence[str] | None = None) -> list[Evaluator]:
    """The evaluators named in config.eval.evaluators (or `names`), from their sections of a validated config.
    Their data folders are resolved here: an evaluator with no `data_dir` while `config.data.data_dir` is unset is
    a ConfigError only when it is built (a config that runs no evaluation needs no data folder)."""
    out = []
    for name in parse_list(config.eval.evaluators) if names is None else list(names):
        spec, ctx = get(name), context(config, name)
        if spec.data_subdir and not ctx.data_dir:
            raise ctx.fail("data_dir", "empty and config.data.data_dir is unset; point one of them at the data "
                                       "(the ../shared/data layout)")
        out.append(spec.build(config.eval[name], ctx))
    return out
