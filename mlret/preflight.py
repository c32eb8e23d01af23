"""Pre-flight check of the local data files a config will read, before any model is loaded or compiled.

`missing_data(config)` lists every local file that a training source or an evaluator of the config needs and
that is not there, with what it is and where its public copy comes from; `check_data(config)` raises a
ConfigError with that list (`mlret.train` calls it in `validate_run`). Only local paths are checked: a source
whose `path` is "" downloads its public files when it is prepared, and those downloads report their own errors.
Reads nothing but directory entries: no jax, no TFDS.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlret.config import ConfigError

# What a file is and where the public copy comes from, per source kind / evaluator (for the error message).
ORIGIN = {
    "mlqa_r": "MLQA-R (LAReQA: MLQA dev with sentence breaks; CC BY-NC 4.0, research only), "
              "https://github.com/google-research-datasets/lareqa/tree/354d67d1cd066854cdfbf5ad0e6105528976141d/mlqa-r"
              " (removed upstream after that commit)",
    "xquad_r": "XQuAD-R (LAReQA; CC BY-SA 4.0), https://github.com/google-research-datasets/lareqa/tree/master/xquad-r",
    "tatoeba": "the LASER Tatoeba test set (CC BY 2.0 FR), "
               "https://github.com/facebookresearch/LASER/tree/main/data/tatoeba/v1",
    "miracl": "MIRACL v1.0 topics / qrels, https://huggingface.co/datasets/miracl/miracl (corpus: "
              "https://huggingface.co/datasets/miracl/miracl-corpus)",
    "mrtydi": "Mr. TyDi v1.1, https://github.com/castorini/mr.tydi",
    "tydiqa": "TyDi QA primary task, https://github.com/google-research-datasets/tydiqa",
    "squad_translate": "SQuAD v1.1 + XTREME translate-train, https://github.com/google-research/xtreme",
    "mlqa": "MLQA, https://github.com/facebookresearch/MLQA",
    "mmarco": "mMARCO, https://huggingface.co/datasets/unicamp-dl/mmarco",
    "tydiqa_goldp": "TyDi QA GoldP, https://github.com/google-research-datasets/tydiqa",
    "jsonl": "your own parallel units (docs/architecture.md, 'Data')",
}


@dataclasses.dataclass(frozen=True)
class Missing:
    """Files one part of the config needs and does not find."""

    who: str  # e.g. "training source config.data.sources[0] (mlqa_r)"
    field: str  # the config field that points at them
    files: tuple[str, ...]
    origin: str


def _found_below(root: Path, name: str) -> bool:
    # The TFDS builders accept the public file names anywhere below a source's folder (mlret.data.tfds_builders).
    return (root / name).is_file() or any(root.rglob(name))


def _source_missing(config: Any) -> list[Missing]:
    from mlret.data.sources import parse_sources
    from mlret.eval.lareqa import MLQA_R_LANGUAGES, XQUAD_R_LANGUAGES

    out = []
    for i, spec in enumerate(parse_sources(config)):
        if not spec.path:
            continue  # downloads its public files
        who = f"training source config.data.sources[{i}] ({spec.name})"
        field = f"config.data.sources[{i}].path (relative to config.data.data_dir)"
        root = Path(spec.path)
        if spec.name in ("mlqa_r", "xquad_r"):
            langs = spec.languages or (MLQA_R_LANGUAGES if spec.name == "mlqa_r" else XQUAD_R_LANGUAGES)
            files = [str(root / f"{lang}.json") for lang in langs
                     if not root.is_dir() or not _found_below(root, f"{lang}.json")]
        else:
            files = [] if root.exists() else [str(root)]
        if files:
            out.append(Missing(who, field, tuple(files), ORIGIN.get(spec.name, spec.name)))
    return out


def _evaluator_missing(config: Any) -> list[Missing]:
    from mlret.eval import build_evaluators, parse_list

    if not parse_list(config.eval.evaluators):
        return []
    out = []
    for ev in build_evaluators(config):  # reads nothing: paths only
        field = f"config.eval.{ev.name}.data_dir (default: config.data.data_dir/...)"
        files: list[str] = []
        if ev.name in ("xquad_r", "mlqa_r"):
            files = [os.path.join(ev.data_dir, f"{lang}.json") for lang in ev.languages]
        elif ev.name == "tatoeba":
            files = [os.path.join(ev.data_dir, f"tatoeba.{lang}-eng.{side}") for lang in ev.languages
                     for side in (lang, "eng")]
        elif ev.name in ("miracl", "mrtydi"):
            for lang in ev.languages:
                topics, qrels, corpus = ev.paths(lang)
                files += [topics, qrels, corpus]
            field = f"config.eval.{ev.name}.data_dir / config.eval.{ev.name}.corpus"
        elif ev.name == "tydiqa":
            files = [config.eval.tydiqa.path]
            field = "config.eval.tydiqa.path"
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            out.append(Missing(f"evaluator {ev.name}", field, tuple(missing), ORIGIN.get(ev.name, ev.name)))
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
                                                   not os.path.isdir(config.data.data_dir) else "") + ":"]
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
