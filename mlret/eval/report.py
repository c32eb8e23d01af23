"""Result tables a person reads: one per benchmark, settings as rows and the question's metrics as columns, the
trained model's numbers beside the start model's (zero-shot) with the change.

`comparison(summary, baseline)` lays a benchmark's flat summary out as a `Table`; `Table.text()` is what the
console prints at the end of a run, `Table.markdown()` what the model card shows. Both take the summaries that
`mlret.eval.run_evaluators` returns (or `flat_metrics` splits back by `summaries_from_flat`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

# LAReQA (XQuAD-R / MLQA-R): settings as rows; the rank distance (language bias) exists for `multi` only.
LAREQA_SETTINGS = ("mono", "cross", "multi")
LAREQA_COLUMNS = (("MRR", "mrr"), ("acc@1", "acc1"), ("mAP", "map"), ("R@10", "r10"))
RANK_DISTANCE = ("rank distance", "multi_rank_distance")
# Tatoeba: the two directions and their mean as rows, accuracy the column.
TATOEBA_ROWS = (("xx->en", "xx2en"), ("en->xx", "en2xx"), ("mean", "acc"))


@dataclasses.dataclass(frozen=True)
class Table:
    """A benchmark's table: `cells[r][c]` is (trained, zero-shot or None), None where the metric does not exist."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[str, ...]
    cells: tuple[tuple[tuple[float, float | None] | None, ...], ...]
    row_title: str = "setting"  # the markdown header of the row names

    def _cells(self, row: Sequence[tuple[float, float | None] | None]) -> list[str]:
        return [_cell(c, 1 if title == RANK_DISTANCE[0] else 3) for title, c in zip(self.columns, row)]

    def text(self) -> str:
        """Aligned plain text (the console)."""
        grid = [("", *self.columns)] + [(r, *self._cells(row)) for r, row in zip(self.rows, self.cells)]
        widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                 for line in grid]
        return "\n".join([self.title, *("  " + x.rstrip() for x in lines)])

    def markdown(self) -> list[str]:
        """A markdown table (the model card)."""
        head = [f"| {self.row_title} | " + " | ".join(self.columns) + " |", "|---" * (len(self.columns) + 1) + "|"]
        return head + [f"| {r} | " + " | ".join(self._cells(row)) + " |" for r, row in zip(self.rows, self.cells)]


def _cell(cell: tuple[float, float | None] | None, digits: int) -> str:
    """"0.806 -> 0.771 (-0.035)" with a baseline, "0.771" without, "-" where the metric does not exist."""
    if cell is None:
        return "-"
    value, base = cell
    num = lambda v, sign="": "nan" if math.isnan(v) else f"{v:{sign}.{digits}f}"
    return num(value) if base is None else f"{num(base)} -> {num(value)} ({num(value - base, '+')})"


def layout(summary: Mapping[str, float]) -> tuple[tuple[str, ...], list[tuple[str, list[str | None]]]]:
    """(column titles, [(row name, [summary key or None per column])]) for a benchmark's summary keys."""
    settings = [s for s in LAREQA_SETTINGS if f"{s}_map" in summary]
    if settings:
        columns = (*(t for t, _ in LAREQA_COLUMNS), RANK_DISTANCE[0])
        rows = [(s, [f"{s}_{k}" for _, k in LAREQA_COLUMNS] + [RANK_DISTANCE[1] if s == "multi" else None])
                for s in settings]
        return columns, rows
    if all(k in summary for _, k in TATOEBA_ROWS):
        return ("accuracy",), [(name, [key]) for name, key in TATOEBA_ROWS]
    keys = list(summary)
    return tuple(keys), [("all", keys)]


def comparison(name: str, summary: Mapping[str, float], baseline: Mapping[str, float] | None = None, *,
               step: int | None = None) -> Table:
    """One benchmark's Table; `baseline` (the start model's summary) adds the zero-shot value and the change."""
    columns, rows = layout(summary)

    def cell(key: str | None) -> tuple[float, float | None] | None:
        if key is None or key not in summary:
            return None
        base = baseline.get(key) if baseline else None
        return float(summary[key]), None if base is None else float(base)

    title = name + (f" (step {step}" + (", zero-shot -> trained (change)" if baseline else "") + ")"
                    if step is not None else "")
    return Table(title, columns, tuple(r for r, _ in rows), tuple(tuple(cell(k) for k in keys) for _, keys in rows))


def summaries_from_flat(metrics: Mapping[str, float], names: Sequence[str] | None = None) -> dict[str, dict]:
    """{"xquad_r/multi_map": v, ...} (a metrics.jsonl evaluation line) -> {"xquad_r": {"multi_map": v}, ...}."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, sep, metric = key.partition("/")
        if sep and (names is None or name in names) and isinstance(value, (int, float)):
            out.setdefault(name, {})[metric] = float(value)
    return out


# The by-dimension table's column titles for the summary keys config.eval.dim_metrics usually names.
DIM_TITLES = {"mono_map": "mono mAP", "cross_map": "cross mAP", "multi_map": "multi mAP",
              "multi_rank_distance": RANK_DISTANCE[0], "rank_distance": RANK_DISTANCE[0], "ndcg10": "nDCG@10",
              "recall100": "R@100", "mrr": "MRR", "acc": "accuracy", "acc1": "acc@1"}


def by_dimension(name: str, by_dim: Mapping[int | str, Mapping[str, float]], metrics: Sequence[str]) -> Table:
    """The compact table of an evaluation by embedding dimension (`mlret.eval.dims`): one row per dimension,
    largest first, one column per metric of `metrics` the summaries have."""
    rows = sorted(by_dim.items(), key=lambda kv: -int(kv[0]))
    keys = [k for k in metrics if any(k in s for _, s in rows)]
    cells = tuple(tuple((float(s[k]), None) if k in s else None for k in keys) for _, s in rows)
    return Table(f"{name} by embedding dimension", tuple(DIM_TITLES.get(k, k) for k in keys),
                 tuple(str(d) for d, _ in rows), cells, row_title="dimension")
