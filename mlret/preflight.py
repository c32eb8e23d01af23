"""Pre-flight checks before any model is loaded or compiled: the storage a config uses, and its data files.

`check_storage(config)` runs `mlret.storage.check_storage` on every gs:// path of the config (the endpoint
answers, credentials exist, the bucket exists, the run may write where it writes).

`missing_data(config)` lists every data file (local or gs://) that a training source or an evaluator of the config
needs and that is not there, with what it is and where its public copy comes from; `check_data(config)` raises a
ConfigError with that list (`mlret.config.validate` calls both when given `devices`). A source
whose `path` is "" downloads its public files when it is prepared, and those downloads report their own errors.
Reads nothing but directory entries: no jax, no TFDS.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from mlret import storage
from mlret.data.kinds import KINDS, find
from mlret.data.sources import parse_sources
from mlret.errors import ConfigError
from mlret.eval import registry as eval_registry


@dataclasses.dataclass(frozen=True)
class Missing:
    """Files one part of the config needs and does not find."""

    who: str  # e.g. "training source config.data.sources[0] (mlqa_r)"
    field: str  # the config field that points at them
    files: tuple[str, ...]
    origin: str


def storage_fields(config: Any) -> list[tuple[str, str, bool]]:
    """(field, path, whether the run writes there) of every storage path of a training config."""
    cache = ("JAX_COMPILATION_CACHE_DIR", os.environ["JAX_COMPILATION_CACHE_DIR"]) if os.environ.get(
        "JAX_COMPILATION_CACHE_DIR") else ("config.train.compilation_cache_dir", config.train.compilation_cache_dir)
    return [("config.workdir (--workdir)", config.workdir, True), (*cache, True),
            ("config.data.data_dir", config.data.data_dir, False), ("config.data.tfds_dir", config.data.tfds_dir, True),
            ("config.export.dir", config.export.dir if storage.is_gcs(config.export.dir) else "", True),
            ("config.eval.output_dir", config.eval.output_dir, True),
            ("config.model.name", config.model.name if storage.is_gcs(config.model.name) else "", False)]


def check_storage(config: Any) -> None:
    """Raise ConfigError, within seconds, for a gs:// path of the config that cannot work (`storage_fields`)."""
    storage.check_storage(storage_fields(config))


def _source_missing(config: Any) -> list[Missing]:
    out = []
    for i, spec in enumerate(parse_sources(config)):
        if not spec.path:
            continue  # downloads its public files
        kind = KINDS[spec.name]
        root = storage.path(spec.path, f"config.data.sources[{i}].path")
        if kind.local_files is not None:
            # The readers accept the public file names anywhere below a source's folder (mlret.data.kinds).
            names = kind.local_files(spec.languages or kind.languages, spec.split)
            files = [str(root / name) for name in names if not root.is_dir() or find(root, name) is None]
        else:
            files = [] if root.exists() else [str(root)]
        if files:
            out.append(Missing(f"training source config.data.sources[{i}] ({spec.name})",
                               f"config.data.sources[{i}].path (relative to config.data.data_dir)", tuple(files),
                               kind.origin))
    return out


def _evaluator_missing(config: Any) -> list[Missing]:
    out = []
    for ev in eval_registry.build(config):  # reads nothing: paths only
        spec = eval_registry.get(ev.name)
        missing = [f for f in spec.files(ev) if not storage.path(f).exists()]
        if missing:
            out.append(Missing(f"evaluator {ev.name}", f"config.eval.{ev.name}.{spec.files_field}", tuple(missing),
                               spec.origin or ev.name))
    return out


def missing_data(config: Any, *, sources: bool = True, evaluators: bool = True) -> list[Missing]:
    """Every local data file the config's training sources and evaluators need and do not find."""
    return (_source_missing(config) if sources else []) + (_evaluator_missing(config) if evaluators else [])


def _compact(files: Sequence[str]) -> str:
    """Every file, grouped by folder as DIR/{a,b,c} (exact and complete, yet one line per folder)."""
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(os.path.dirname(f), []).append(os.path.basename(f))
    parts = [os.path.join(d, names[0]) if len(names) == 1 else os.path.join(d, "{" + ",".join(names) + "}")
             for d, names in by_dir.items()]
    return "; ".join(parts)


def format_missing(config: Any, missing: Sequence[Missing]) -> str:
    n = sum(len(m.files) for m in missing)
    data_dir = config.data.data_dir or "(unset)"
    lines = [f"{n} data file(s) this config reads are missing (nothing was loaded or compiled); "
             f"config.data.data_dir={data_dir}" + (" does not exist" if config.data.data_dir and
                                                   not storage.path(config.data.data_dir).is_dir() else "") + ":"]
    for m in missing:
        lines.append(f"  - {m.who}: {_compact(list(m.files))}")
        lines.append(f"      from {m.origin}; set by {m.field}")
    lines.append("Point config.data.data_dir at a folder with this layout: set MLRET_DATA_DIR or pass "
                 "--config.data.data_dir=DIR (../shared/data beside the checkout has every file of the demo).")
    return "\n".join(lines)


def check_data(config: Any, *, sources: bool = True, evaluators: bool = True) -> None:
    """Raise ConfigError listing the missing local data files (see the module docstring); silent when all exist.
    `sources` / `evaluators` pick what is checked (training without periodic evaluation reads no evaluation data)."""
    missing = missing_data(config, sources=sources, evaluators=evaluators)
    if missing:
        raise ConfigError(format_missing(config, missing))
