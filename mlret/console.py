"""What a training run shows a person: progress with ETA, one line per evaluation, and at the end one table per
benchmark (zero-shot -> trained, with the change), a language-pair heatmap, the wall time and the peak memory.
Everything else (orbax / absl INFO, jax backend probing, mlret's own INFO lines) goes to the run's log file.

    setup_logging(workdir, level)           # at the start of `python -m mlret.train`
    console.evaluation(step, results, seconds)
    console.final(results, baseline, workdir)

`level` is config.train.log_level: "warning" (default) shows only warnings and errors of mlret on the terminal,
"info" (`--verbose`) everything at INFO and above, libraries included. The file `<workdir>/train.log` always
gets INFO and above from every logger.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

from absl import logging as absl_logging
from etils import epath

from mlret import storage
from mlret.eval.base import heatmap
from mlret.eval.lareqa import pair_matrix
from mlret.eval.report import by_dimension, comparison, summaries_from_flat

LOG_FILE = "train.log"
HEATMAP_METRIC = "map"
# Below this many scored queries an evaluator is a schema check, not a result: the standard error of a mean
# reciprocal rank over n queries is about 0.4 / sqrt(n) (0.16 for the 6 scored questions of the offline TyDi QA
# sample, 0.04 at 100), so its zero-shot -> trained change is noise. Its table is replaced by one line saying so.
SCHEMA_CHECK_BELOW = 100


class _OwnWarnings(logging.Filter):
    """The terminal's filter at the default level: mlret's warnings, not the libraries'."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "mlret" or record.name.startswith(("mlret.", "__main__"))


_TO_UPLOAD: list[tuple[epath.Path, epath.Path]] = []  # (local mirror, gs:// train.log) of setup_logging


def upload_log() -> None:
    """Append this process's lines of a gs:// run's train.log (its local mirror) to the bucket's copy."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    while _TO_UPLOAD:
        local, path = _TO_UPLOAD.pop()
        storage.append_to(path, local.read_bytes())


def setup_logging(workdir: str | os.PathLike[str], level: str = "warning") -> epath.Path:
    """Route every logger to `<workdir>/train.log` (INFO+) and the terminal to `level`; returns the log path.

    absl's handler (which `absl.app.run` puts on the root logger, printing every orbax INFO line) is replaced,
    and absl's own verbosity is set so that its records reach the file through the standard logging tree.
    A gs:// workdir's log is written to its local mirror (`storage.local_mirror`) and appended to the bucket's
    copy by `upload_log()` at the end of the run; a killed process, or one stopped by the pre-flight, leaves it in
    the local mirror only (nothing touches the bucket before the pre-flight has checked it).
    """
    path = storage.path(workdir, "config.workdir") / LOG_FILE
    local = storage.local_mirror(path) if storage.is_gcs(path) else path
    local.parent.mkdir(parents=True, exist_ok=True)
    if local != path:
        local.write_text("")  # this process's lines only: they are appended to the bucket's log at exit
        _TO_UPLOAD.append((local, path))
    route_logging(local, level)
    return path


def route_logging(log_file: str | os.PathLike[str] | None, level: str = "warning") -> None:
    """Every logger to the local file `log_file` (INFO+; None: no file) and the terminal to `level`: "warning"
    shows mlret's own warnings and errors only, "info" (`--verbose`) every library's INFO and above. What
    `setup_logging` does for a run directory, and what `mlret.evaluate`, `mlret.export` and `mlret.mine` do
    for the log file beside their output. Call it before transformers is first imported: its import-time
    advice ("PyTorch was not found ...") is printed by its own handler."""
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if level == "warning":
        terminal.setLevel(logging.WARNING)
        terminal.addFilter(_OwnWarnings())
    else:
        terminal.setLevel(logging.getLevelName(level.upper()))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if log_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(log_file))), exist_ok=True)
        to_file = logging.FileHandler(os.fspath(log_file), encoding="utf-8")
        to_file.setLevel(logging.INFO)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(to_file)
    root.addHandler(terminal)
    root.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_logger().propagate = True
    # transformers has its own stderr handler and does not propagate; its import-time advice ("PyTorch was not
    # found ...") is only advice on a machine that needs no torch.
    if level == "warning":
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging  # lazy: imported only after the advisory setting above

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    # Python warnings (deprecations from libraries) are log records too, so they follow the same routing.
    logging.captureWarnings(True)


def peak_memory_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _fmt_seconds(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def sample_sizes(results: Mapping[str, Any]) -> dict[str, int]:
    """{evaluator: scored queries} of `mlret.eval.EvalResult`s: the most rows of any of its per-query settings
    (LAReQA's mono setting holds every language's questions; TyDi QA only the examples with a gold passage)."""
    out = {}
    for name, result in results.items():
        sizes = [len(pq.ids) for pq in (getattr(result, "per_query", None) or {}).values()]
        if sizes:
            out[name] = max(sizes)
    return out


def schema_check(name: str, sizes: Mapping[str, int] | None) -> str | None:
    """"tydiqa: schema check, 6 queries" when `name` scored fewer than SCHEMA_CHECK_BELOW queries, else None."""
    n = (sizes or {}).get(name)
    return f"{name}: schema check, {n} queries" if n is not None and n < SCHEMA_CHECK_BELOW else None


def _eval_digest(name: str, summary: Mapping[str, float]) -> str:
    """A few numbers that say how an evaluator went (the full set is in metrics.jsonl and the final table)."""
    if "multi_map" in summary:
        settings = [s for s in ("mono", "cross", "multi") if f"{s}_map" in summary]
        out = f"{name} mAP {'/'.join(settings)} " + " / ".join(f"{summary[f'{s}_map']:.3f}" for s in settings)
        if "multi_rank_distance" in summary:
            out += f", rank distance {summary['multi_rank_distance']:.1f}"
        return out
    return f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in list(summary.items())[:3])


class Console:
    """The terminal side of a run (process 0 prints; other processes are silent)."""

    def __init__(self, *, enabled: bool = True, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream
        self.t0 = time.perf_counter()
        self.cpu0 = sum(os.times()[:2])

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream or sys.stdout, flush=True)

    def evaluation(self, step: int, results: Mapping[str, Mapping[str, Any]], seconds: float,
                   sizes: Mapping[str, int] | None = None) -> None:
        """One line: a digest per evaluator; one whose sample is too small (`sizes`: scored queries by
        evaluator, `sample_sizes`) is named as the schema check it is."""
        label = "zero-shot (step 0)" if step == 0 else f"step {step}"
        self.print(f"eval {label} ({seconds:.0f} s): "
                   + "; ".join(schema_check(name, sizes) or _eval_digest(name, block["summary"])
                               for name, block in results.items()))

    def final(self, results: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, Mapping[str, float]] | None,
              workdir: str | os.PathLike[str], *, heatmap: str | None = None,
              sizes: Mapping[str, int] | None = None) -> str:
        """The end-of-run report: one table per benchmark, the heatmap's path, wall time and peak memory. A
        benchmark that scored fewer than SCHEMA_CHECK_BELOW queries (`sizes`) gets one line instead of a table."""
        lines = []
        for name, block in results.items():
            if small := schema_check(name, sizes):
                lines += [f"{small} (too few for its numbers to mean anything; they are in metrics.jsonl)", ""]
                continue
            base = (baseline or {}).get(name)
            lines += [comparison(name, block["summary"], base, step=block.get("step")).text(), ""]
            if block.get("by_dim"):  # evaluated at several embedding dimensions (mlret.eval.dims)
                lines += [by_dimension(name, block["by_dim"], block.get("dim_metrics", ())).text(), ""]
        if not baseline:
            lines.append("no zero-shot evaluation in this run (config.eval.at_start=False): trained numbers only")
        if heatmap:
            lines.append(f"language pairs ({HEATMAP_METRIC}, last evaluation): {heatmap}")
        lines.append(f"log: {storage.path(workdir) / LOG_FILE} (library messages, timings; "
                     "--config.train.log_level=info shows them here)")
        report = "\n".join(lines)
        self.print(report)
        return report

    def resources(self) -> str:
        """Wall time, CPU time and peak memory of the process so far (the README's figures come from this)."""
        wall = time.perf_counter() - self.t0
        cpu = sum(os.times()[:2]) - self.cpu0
        line = (f"wall time {_fmt_seconds(wall)} ({wall:.0f} s), CPU time {cpu:.0f} s, peak memory "
                f"{peak_memory_bytes() / 2**30:.1f} GiB (peak RSS of this process)")
        self.print(line)
        return line


def zero_shot_from_log(records: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]] | None:
    """The step-0 evaluation of a run (its metrics.jsonl records), by evaluator; None if there was none."""
    for record in records:
        if record.get("step") == 0:
            found = summaries_from_flat(record, names)
            if found:
                return found
    return None


def write_heatmap(results: Mapping[str, Mapping[str, Any]], workdir: str | os.PathLike[str]) -> str | None:
    """`<workdir>/<benchmark>_pairs_map.png` of the first LAReQA benchmark in `results` (query x candidate
    language mAP; the diagonal is monolingual); returns its path, or None when no evaluator has language pairs."""
    for name, block in results.items():
        if "languages" in block and "mono" in block and "cross" in block:
            order = block["languages"]
            path = str(storage.path(workdir, "config.workdir") / f"{name}_pairs_{HEATMAP_METRIC}.png")
            step = block.get("step")
            heatmap(path, pair_matrix(block, HEATMAP_METRIC), order, order,
                    f"{name}: {HEATMAP_METRIC}" + (f" at step {step}" if step is not None else "")
                    + "\nrows: query language, columns: candidates",
                    xlabel="candidate language", ylabel="query language")
            return path
    return None
