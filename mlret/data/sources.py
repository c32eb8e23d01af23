"""config.data.sources -> source specs, and the rules of the `data` config section.

A source is a dict in `config.data.sources`:

    {"name": "mlqa_r", "path": "mlqa-r", "weight": 1.0, "split": "train", "languages": "de,en"}

`name` is a registered source kind (`mlret.data.kinds.KINDS`), `path` a local folder or file (relative paths
are under `config.data.data_dir`; "" downloads the public files), `weight` counts when
`config.data.mixture="weights"`, `split` is the upstream split to read (default: the kind's), `languages` an
optional comma list restricting the languages. A few kinds take extra keys (their record's
`options`): squad_translate `passage` / `id_pattern`, mlqa `passage`, mmarco `max_units`.

This module imports nothing heavy: `mlret.config.validate` calls `validate_data` before any device work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mlret import storage
from mlret.data.kinds import KINDS
from mlret.data.schedule import parse_lang_weights
from mlret.data.units import LANG_INDEX
from mlret.errors import ConfigError

_BASE_KEYS = ("name", "path", "weight", "split", "languages")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of config.data.sources, checked and with defaults filled in."""

    name: str
    path: str = ""  # resolved against data_dir; "" downloads
    weight: float = 1.0
    split: str = "train"
    languages: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()


def _as_mapping(entry: Any) -> Mapping[str, Any]:
    if isinstance(entry, Mapping):
        return entry
    if hasattr(entry, "to_dict"):  # an ml_collections.ConfigDict
        return entry.to_dict()
    raise ValueError(f"a source is a dict with name/path/weight/split/languages, got {type(entry).__name__}")


def parse_source(entry: Any, data_dir: str = "", *, field: str = "config.data.sources[0]") -> SourceSpec:
    """Check one source entry; raises ValueError naming the field and what would fix it."""
    m = dict(_as_mapping(entry))
    name = m.get("name")
    if name not in KINDS:
        raise ValueError(f"{field}.name: {name!r} is not a source kind ({', '.join(KINDS)})")
    kind = KINDS[name]
    if not kind.licence:
        raise ValueError(f"{field}.name: the source kind {name!r} has no licence (SourceKind.licence, which the model "
                         "card states); register it with licence=\"...\"")
    extra = set(m) - set(_BASE_KEYS) - set(kind.options)
    if extra:
        raise ValueError(f"{field}: unknown key(s) {sorted(extra)} for {name} (allowed: "
                         f"{', '.join(_BASE_KEYS + kind.options)})")
    langs = m.get("languages", "")
    if isinstance(langs, str):
        langs = tuple(x.strip() for x in langs.split(",") if x.strip())
    langs = tuple(langs)
    unknown = [x for x in langs if x not in LANG_INDEX]
    if unknown:
        raise ValueError(f"{field}.languages: unknown language code(s) {unknown} (ISO 639-1, mlret.data.LANGUAGES)")
    try:
        weight = float(m.get("weight", 1.0))
    except (TypeError, ValueError):
        raise ValueError(f"{field}.weight: {m.get('weight')!r} is not a number") from None
    if weight < 0:
        raise ValueError(f"{field}.weight: {weight} is negative")
    path = str(m.get("path", "") or "")
    if path and data_dir:
        path = str(storage.join(data_dir, path, f"{field}.path"))
    if kind.needs_path and not path:
        raise ValueError(f"{field}.path: a {name} source needs the path of its file or folder")
    options = tuple(sorted((k, m[k]) for k in kind.options if k in m))
    why = kind.check(dict(options))
    if why:
        raise ValueError(f"{field}.{why}")
    return SourceSpec(name=name, path=path, weight=weight, split=str(m.get("split", kind.split)),
                      languages=langs, options=options)


def parse_sources(config: Any) -> list[SourceSpec]:
    """All of config.data.sources, checked."""
    return [parse_source(e, config.data.data_dir, field=f"config.data.sources[{i}]")
            for i, e in enumerate(config.data.sources)]


def validate_data(config: Any) -> None:
    """The rules of the `config.data` section and of each of its sources; raises ConfigError naming the field."""
    d = config.data
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"config.data.alpha: {d.alpha} is outside [0, 1]")
    if d.global_batch <= 0:
        raise ConfigError("config.data.global_batch: must be positive")
    if d.group_size < 1:
        raise ConfigError("config.data.group_size: must be >= 1 (the positive)")
    if d.on_bad_record not in ("error", "skip"):
        raise ConfigError(f"config.data.on_bad_record: {d.on_bad_record!r} is not error or skip")
    try:
        specs = parse_sources(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if d.mixture not in ("size", "weights"):
        raise ConfigError(f"config.data.mixture: {d.mixture!r} is not size or weights")
    if d.mixture == "weights" and specs and sum(s.weight for s in specs) <= 0:
        raise ConfigError("config.data.sources[*].weight: with mixture='weights' the weights must not all be 0")
    try:
        parse_lang_weights(d.mono_lang_weights)
    except ValueError as e:
        raise ConfigError(f"config.data.mono_lang_weights: {e}") from None
    for field in ("worker_count", "prefetch", "max_negatives"):
        if d[field] < 0:
            raise ConfigError(f"config.data.{field}: {d[field]} is negative")
    if d.read_threads < 1:
        raise ConfigError("config.data.read_threads: must be >= 1")
    if d.packing_rows_multiple < 1:
        raise ConfigError("config.data.packing_rows_multiple: must be >= 1")
    if d.query_len <= 0 or d.passage_len <= 0:
        raise ConfigError("config.data.query_len / passage_len: must be positive")
