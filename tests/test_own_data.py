"""docs/own-data.md: its commands, run as written on a small JSONL file of real MLQA-R units (tiny model, a few
steps, a small evaluation subset), go from the file to an exported model; a malformed line stops with the file,
the line number and the field."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlret.data.readers import read_squad_sentences

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "own-data.md"
# Cheap settings appended to the doc's commands (the doc's are the real run's).
TINY = ["--config.train.steps=2", "--config.optim.warmup_steps=1", "--config.eval.every=2",
        "--config.checkpoint.every=2", "--config.data.global_batch=4", "--config.eval.evaluators=xquad_r",
        "--config.eval.xquad_r.languages=en,de", "--config.eval.xquad_r.max_paragraphs=4",
        "--config.eval.progress=false", "--config.train.compilation_cache_dir="]


def doc_commands() -> list[list[str]]:
    """The `python -m mlret...` lines of the doc's bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    return [shlex.split(line) for b in blocks for line in b.splitlines() if line.startswith("python -m mlret.")]


@pytest.fixture(scope="module")
def units_file(tmp_path_factory, shared_data):
    """40 real parallel units (MLQA-R de / en / es) as the doc's JSONL lines."""
    files = {lang: shared_data / "mlqa-r" / f"{lang}.json" for lang in ("de", "en", "es")}
    units = [u for u in read_squad_sentences(files, source="mlqa_r") if len(u.texts) >= 2][:40]
    path = tmp_path_factory.mktemp("own") / "my_units.jsonl"
    path.write_text("".join(json.dumps(u.to_json(), ensure_ascii=False) + "\n" for u in units), encoding="utf-8")
    return path


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def _env(tmp_path: Path, model: Path, shared_data: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "MLRET_MODEL": str(model), "MLRET_DATA_DIR": str(shared_data),
            "TFDS_DATA_DIR": str(tmp_path / "tfds"), "XLA_FLAGS": ""}


def test_the_docs_commands_train_and_export(units_file, random_bert_path, shared_data, tmp_path):
    from sentence_transformers import SentenceTransformer

    cmds = doc_commands()
    assert [c[:3] for c in cmds] == [["python", "-m", "mlret.data"], ["python", "-m", "mlret.train"]]
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the doc's paths are relative to the checkout
    (tmp_path / "my_units.jsonl").symlink_to(units_file)
    env = _env(tmp_path, random_bert_path, shared_data)
    preview, train = (_run(c + (TINY if c[2] == "mlret.train" else []), tmp_path, env) for c in cmds)
    assert preview.returncode == 0, preview.stderr[-3000:]
    assert "mono" in preview.stdout and (tmp_path / "runs" / "own-schedule.json").is_file()
    assert train.returncode == 0, train.stderr[-3000:]
    out = tmp_path / "runs" / "own" / "export"
    assert "zero-shot -> trained" in train.stdout and str(out) in train.stdout
    card = (out / "README.md").read_text()
    assert "| jsonl |" in card and "state it here" in card  # the user's data: its licence is theirs to state
    st = SentenceTransformer(str(out), device="cpu")
    q = st.encode_query(["Wie viele Menschen leben in Berlin?"])
    p = st.encode_document(["Berlin has about 3.7 million inhabitants."])
    assert np.isfinite(st.similarity(q, p).numpy()).all()


def test_a_malformed_line_names_file_line_and_field(units_file, random_bert_path, shared_data, tmp_path):
    lines = units_file.read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[2])
    lang = sorted(bad["texts"])[0]
    bad["texts"][lang]["query"] = ""
    lines[2] = json.dumps(bad, ensure_ascii=False)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = _env(tmp_path, random_bert_path, shared_data)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for cmd in doc_commands():
        cmd = [a.replace("my_units.jsonl", str(path)) for a in cmd]
        r = _run(cmd + (TINY if cmd[2] == "mlret.train" else []), tmp_path, env)
        assert r.returncode == 2, r.stderr[-3000:]
        message = r.stderr.strip().splitlines()[-1]
        assert f"{path}:3:" in message and f"language {lang}: empty query" in message, message
        assert "Traceback" not in r.stderr
