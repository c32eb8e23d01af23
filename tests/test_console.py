"""mlret.console: library chatter goes to <workdir>/train.log, not the terminal, unless asked for; the final report
is one table per benchmark with the zero-shot numbers, the heatmap's path, wall time and peak memory."""

from __future__ import annotations

import logging
import sys

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
