"""Every command turns a user's mistake into one line naming it (exit status 2, no traceback): a missing model
folder, checkpoint, data or results file, an unknown config field, a value of the wrong type or range, a config
file that does not load (`mlret.cli`). Each case is a subprocess that stops before anything compiles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.py")
EVAL = str(REPO / "configs" / "eval_xquad_r.py")

# (id, command, arguments, text the error line must hold). {minilm}: a real model folder; {tmp}: an empty
# folder (no checkpoints, no data); {out}: a path to write to.
CASES = [
    ("evaluate-model", "mlret.evaluate", ["--config", EVAL, "--hf", "{tmp}/no_model", "--out", "{out}"],
     "--hf {tmp}/no_model: no such model folder"),
    ("evaluate-checkpoint", "mlret.evaluate", ["--config", EVAL, "--checkpoint", "{tmp}", "--out", "{out}"],
     "{tmp}/checkpoints: no checkpoints"),
    ("evaluate-data", "mlret.evaluate", ["--config", EVAL, "--hf", "{minilm}", "--out", "{out}",
                                         "--config.data.data_dir={tmp}"], "{tmp}/xquad-r"),
    ("evaluate-field", "mlret.evaluate", ["--config", EVAL, "--hf", "{minilm}", "--out", "{out}",
                                          "--config.eval.batch_sise=8"],
     "--config.eval.batch_sise: no such config field (did you mean 'batch_size'?)"),
    ("evaluate-type", "mlret.evaluate", ["--config", EVAL, "--hf", "{minilm}", "--out", "{out}",
                                         "--config.eval.batch_size=many"], "--config.eval.batch_size=many"),
    ("evaluate-value", "mlret.evaluate", ["--config", EVAL, "--hf", "{minilm}", "--out", "{out}",
                                          "--config.model.pooling=max"], "config.model.pooling: 'max'"),
    ("evaluate-config", "mlret.evaluate", ["--config", "{tmp}/no_config.py", "--hf", "{minilm}", "--out", "{out}"],
     "--config: {tmp}/no_config.py"),
    ("export-model", "mlret.export", ["--hf", "{tmp}/no_model", "--out", "{out}"],
     "--hf {tmp}/no_model: no such model folder"),
    ("export-checkpoint", "mlret.export", ["--checkpoint", "{tmp}", "--out", "{out}"],
     "{tmp}/checkpoints: no checkpoints"),
    ("export-results", "mlret.export", ["--hf", "{minilm}", "--out", "{out}", "--results", "{tmp}/no.json"],
     "--results: {tmp}/no.json: No such file or directory"),
    ("export-value", "mlret.export", ["--hf", "{minilm}", "--out", "{out}", "--pooling", "max"],
     "argument --pooling: invalid choice: 'max'"),
    ("mine-model", "mlret.mine", ["--config", SMOKE, "--hf", "{tmp}/no_model", "--out", "{out}"],
     "--hf {tmp}/no_model: no such model folder"),
    ("mine-checkpoint", "mlret.mine", ["--config", SMOKE, "--checkpoint", "{tmp}", "--out", "{out}"],
     "{tmp}/checkpoints: no checkpoints"),
    ("mine-data", "mlret.mine", ["--config", SMOKE, "--hf", "{minilm}", "--out", "{out}", "data.data_dir={tmp}"],
     "{tmp}/mlqa-r"),
    ("mine-field", "mlret.mine", ["--config", SMOKE, "--hf", "{minilm}", "--out", "{out}", "data.alpah=0.3"],
     "config.data.alpah: no such config field"),
    ("mine-type", "mlret.mine", ["--config", SMOKE, "--hf", "{minilm}", "--out", "{out}", "data.alpha=half"],
     "config.data.alpha: 'half' is not a number"),
    ("mine-value", "mlret.mine", ["--config", SMOKE, "--hf", "{minilm}", "--out", "{out}", "--perc_pos", "2"],
     "--perc_pos: 2.0 is not in (0, 1]"),
    ("mine-config", "mlret.mine", ["--config", "{tmp}/no_config.py", "--hf", "{minilm}", "--out", "{out}"],
     "{tmp}/no_config.py: No such file or directory"),
    ("data-data", "mlret.data", ["--config", SMOKE, "--config.data.data_dir={tmp}"], "{tmp}/mlqa-r"),
    ("data-field", "mlret.data", ["--config", SMOKE, "--config.data.alpah=0.3"],
     "--config.data.alpah: no such config field (did you mean 'alpha'?)"),
    ("data-type", "mlret.data", ["--config", SMOKE, "--config.data.alpha=half"], "--config.data.alpha=half"),
    ("data-value", "mlret.data", ["--config", SMOKE, "--config.data.alpha=3"], "config.data.alpha: 3.0 is outside"),
    ("data-config", "mlret.data", ["--config", "{tmp}/no_config.py"], "--config: {tmp}/no_config.py"),
    ("train-config", "mlret.train", ["--config", "{tmp}/no_config.py"], "--config: {tmp}/no_config.py"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_naming_it(case, tmp_path, minilm_path):
    name, module, args, expected = case
    where = {"tmp": str(tmp_path), "minilm": str(minilm_path), "out": str(tmp_path / "out" / "x.json")}
    r = subprocess.run([sys.executable, "-m", module, *(a.format(**where) for a in args)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    expected = expected.format(**where)
    hit = [x for x in lines if expected in x]
    assert hit, r.stderr[-3000:]
    assert not (tmp_path / "out" / "x.json").exists(), "no output is written (at most the log beside it)"
    if name.endswith("-data"):  # the missing files are listed under one line that says what is missing
        assert lines[0].startswith(f"{module}: ") and "data file(s) this config reads are missing" in lines[0]
    else:  # the output ends with the one line naming the mistake (argparse prints its usage above it)
        assert hit[0] == lines[-1], r.stderr
        assert hit[0].startswith((f"{module}: ", f"python -m {module}: error: ")), r.stderr
