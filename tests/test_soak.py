"""A short soak through the same code as `scripts/soak.py memory` (the 2,000-step run is in docs/robustness.md):
the real loop in process with periodic evaluation, watched by the `mlret.testing.soak.ResourceMonitor` hook,
compiles nothing after the first evaluation and keeps resident memory within 5% after it."""

import sys

from scale_runs import REPO


def test_short_soak_compiles_nothing_after_warmup_and_keeps_memory_flat(random_bert_path, shared_data,
                                                                        tmp_path_factory, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import soak
    finally:
        sys.path.pop(0)
    steps, eval_every = 60, 20
    config = soak.memory_config(random_bert_path, shared_data, tmp_path_factory.mktemp("soak_tfds"), steps,
                                eval_every, checkpoint_every=30)
    out = soak.memory_soak(config, tmp_path / "run", warmup_step=eval_every)
    assert out["end_step"] == steps and out["evals"] == [20, 40, 60]
    # The first evaluation compiled its encoders (and the step before it compiled); later ones reuse them.
    assert out["compiles_total"] > 0
    assert out["compiles_after_warmup"] == [], out["compiles_after_warmup"]
    assert out["growth"]["samples"] >= 4
    assert out["growth"]["growth"] <= 0.05, out["growth"]
