"""`python -m mlret.data`: the schedule preview writes per-step JSON and prints a summary that agrees with
it."""

import collections
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mlret.data", "--config", str(REPO / "configs" / "smoke.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_schedule_preview(tmp_path, shared_data):
    out = tmp_path / "schedule.json"
    r = _run("--steps", "300", "--out", str(out), f"--config.data.tfds_dir={tmp_path / 'tfds'}",
             f"--config.data.data_dir={shared_data}", "--config.data.alpha=0.3")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["steps"]
    assert [row["step"] for row in rows] == list(range(300))
    kinds = collections.Counter(row["batch_type"] for row in rows)
    for row in rows:
        assert len(row["pairs"]) == len(row["unit_ids"]) == 16
        assert len(set(row["unit_ids"])) == 16
        langs = {x for pair in row["pairs"] for x in pair}
        if row["batch_type"] == "mono":
            assert len(langs) == 1
        else:
            assert all(x != y for x, y in row["pairs"])
    summary = result["summary"]
    assert summary["type_fraction"] == {"mono": kinds["mono"] / 300, "cross": kinds["cross"] / 300}
    pairs = collections.Counter(f"{x}-{y}" for row in rows if row["batch_type"] == "cross" for x, y in row["pairs"])
    assert summary["cross_pair_counts"] == dict(sorted(pairs.items()))
    # The printed table carries the same numbers.
    assert f"mono         {kinds['mono'] / 300:.4f}" in r.stdout
    assert "X-Y pairs (rows: query language, columns: passage language" in r.stdout


def test_schedule_preview_rejects_bad_config(tmp_path):
    r = _run("--steps", "5", f"--config.data.tfds_dir={tmp_path}", "--config.data.mono_lang_weights=en=1,xx=2")
    assert r.returncode != 0
    assert "config.data.mono_lang_weights: 'xx=2' is not LANG=WEIGHT" in r.stderr
