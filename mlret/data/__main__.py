"""Schedule preview: what the hybrid schedule of a config does, step by step, without tokenising anything.

    python -m mlret.data --config configs/smoke.py --steps 1000 --out schedule.json [--config.data.alpha=0.3]

Writes, per step, the batch type, the (query_lang, passage_lang) of every pair and the unit ids, and prints a
summary: the fraction of each batch type (with α), the languages of X-X-mono batches, and the X-Y pair counts
as a query-language x passage-language table. `--prepare_only` just prepares the sources (TFDS ArrayRecord).
"""

from __future__ import annotations

import collections
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from mlret import cli, preflight, storage
from mlret.console import route_logging
from mlret.data.sources import validate_data
from mlret.data.units import LANGUAGES, MONOLINGUAL

_CONFIG = config_flags.DEFINE_config_file("config", None, "an experiment config file (configs/*.py)",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 1000, "how many steps to preview")
_OUT = flags.DEFINE_string("out", "", "where to write the per-step JSON (none when empty)")
_START = flags.DEFINE_integer("start", 0, "first step")
_PREPARE_ONLY = flags.DEFINE_bool("prepare_only", False, "prepare the sources and stop")
_VERBOSE = flags.DEFINE_bool("verbose", False, "library INFO messages (TFDS preparing a source) on the terminal too; "
                             "with --out they always go to the log file beside it")


def preview(config, steps: int, start: int = 0) -> dict:
    """The schedule of `steps` steps as JSON-able data, plus a summary."""
    from mlret.data.pipeline import make_schedule  # lazy: jax-free start-up (grain imports jax)

    schedule, sources = make_schedule(config)
    ids = [u.id for _, store in sources for s in range(0, len(store), 4096)
           for u in store.get(range(s, min(s + 4096, len(store))))]
    rows = []
    types = collections.Counter()
    mono_langs = collections.Counter()
    pairs = collections.Counter()
    for t in range(start, start + steps):
        plan = schedule.plan(t)
        q = [LANGUAGES[i] for i in plan.query_lang]
        p = [LANGUAGES[i] for i in plan.passage_lang]
        kind = "mono" if plan.batch_type == MONOLINGUAL else "cross"
        types[kind] += 1
        if kind == "mono":
            mono_langs[q[0]] += 1
        else:
            pairs.update(zip(q, p))
        rows.append({"step": t, "batch_type": kind, "pairs": [list(x) for x in zip(q, p)],
                     "unit_ids": [ids[u] for u in plan.unit]})
    summary = {
        "alpha": config.data.alpha, "steps": steps, "global_batch": config.data.global_batch,
        "type_fraction": {k: types[k] / steps for k in ("mono", "cross")},
        "mono_language_fraction": {k: v / max(1, types["mono"]) for k, v in sorted(mono_langs.items())},
        "cross_pair_counts": {f"{a}-{b}": v for (a, b), v in sorted(pairs.items())},
        "sources": list(schedule.index.source_names), "units": schedule.index.num_units,
    }
    return {"summary": summary, "steps": rows}


def format_summary(summary: dict) -> str:
    lines = [f"{summary['steps']} steps, global batch {summary['global_batch']}, alpha {summary['alpha']}, "
             f"{summary['units']} units from {', '.join(summary['sources'])}",
             "batch type   fraction",
             *(f"{k:<12} {v:.4f}" for k, v in summary["type_fraction"].items()),
             "X-X-mono language   fraction of mono batches",
             *(f"{k:<19} {v:.4f}" for k, v in summary["mono_language_fraction"].items())]
    counts = {tuple(k.split("-")): v for k, v in summary["cross_pair_counts"].items()}
    langs = sorted({x for pair in counts for x in pair})
    if langs:
        total = sum(counts.values())
        lines.append(f"X-Y pairs (rows: query language, columns: passage language; {total} pairs, fraction)")
        lines.append("      " + "".join(f"{y:>8}" for y in langs))
        for x in langs:
            lines.append(f"{x:<6}" + "".join(f"{counts.get((x, y), 0) / total:>8.4f}" if x != y else f"{'-':>8}"
                                             for y in langs))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    prog = "mlret.data"
    if len(argv) > 1:
        cli.fail(prog, f"unexpected arguments {argv[1:]}; overrides look like --config.data.alpha=0.3")
    config = _CONFIG.value
    if config is None:
        cli.fail(prog, "--config is required (e.g. --config configs/smoke.py)")
    route_logging(cli.log_path(_OUT.value) if _OUT.value else None, "info" if _VERBOSE.value else "warning")

    # A field that cannot work, a missing data file, a bad record (its file, line and field): one line each.
    with cli.user_errors(prog):
        validate_data(config)
        preflight.check_data(config, evaluators=False)  # before TFDS prepares anything
        if _PREPARE_ONLY.value:
            from mlret.data.pipeline import load_sources  # lazy: jax-free start-up (grain imports jax)

            for name, store in load_sources(config):
                print(f"{name}: {len(store)} units")
            return
        result = preview(config, _STEPS.value, _START.value)
        if _OUT.value:
            out = storage.path(_OUT.value, "--out")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, ensure_ascii=False))
            print(f"wrote {_OUT.value}", file=sys.stderr)
    print(format_summary(result["summary"]))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("mlret.data"))
