"""What the benchmark scripts share: a description of the machine, and writing a script's own section of
docs/benchmarks.md (between its start/end markers, so that reruns replace it and other sections stay)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_summary() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores visible"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table: the header, the separator and one line per row (cells as str())."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows])


def write_section(start: str, end: str, text: str, path: Path = BENCHMARKS_MD) -> Path:
    """Replace the text between the markers `start` and `end` in `path`, or append it with its markers."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: section, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)
    return path
