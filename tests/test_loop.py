"""The training loop (mlret.loop.run_loop) and the step builder: hooks run in their order around every step, a
hook can stop the run, and during a run the devices hold one copy of the weights (the train state's), not a
second one kept for re-initialisation. A tiny real DualEncoder on 8 simulated CPU devices."""

import gc

import jax
import pytest
from scale_helpers import tiny_batch, tiny_config, tiny_model

from mlret import parallel
from mlret.loop import Hook, run_loop
from mlret.step import build_train_step


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def live_bytes() -> int:
    gc.collect()
    return sum(x.nbytes for x in jax.live_arrays())


def batches(seed: int = 0):
    while True:
        b = tiny_batch(seed)
        b["batch_type"] = [seed % 2]
        yield b
        seed += 1


class Record(Hook):
    """Writes down which hook method ran at which step, and the live bytes beyond the state after each step."""

    def __init__(self, events, baseline: int = 0, stop_at: int = 0) -> None:
        self.events, self.baseline, self.stop_at = events, baseline, stop_at
        self.extra_bytes: list[int] = []

    def begin(self, loop):
        self.events.append(("begin", loop.step))

    def metrics(self, loop, step, m):
        self.events.append(("metrics", step, m["batch_type"]))

    def after_step(self, loop):
        self.events.append(("after_step", loop.step))
        self.extra_bytes.append(live_bytes() - self.baseline - nbytes(loop.state))
        loop.stop = loop.step == self.stop_at

    def end(self, loop):
        self.events.append(("end", loop.step))

    def close(self, loop):
        self.events.append(("close", loop.step))


@pytest.fixture(scope="module")
def tiny_run():
    """Four steps of the tiny model through run_loop, stopped by a hook after step 3 of 5."""
    c = tiny_config((8, 1, 1), steps=5)
    baseline = live_bytes()
    trainer, params = build_train_step(tiny_model(), c, parallel.make_mesh(c.mesh))
    param_bytes = nbytes(params)
    state = trainer.init_state(params)
    del params  # the state owns them now
    events: list = []
    record = Record(events, baseline, stop_at=3)
    loop = run_loop(trainer, state, batches(), start=0, total=5, hooks=[record])
    return loop, events, record, param_bytes


def test_hooks_run_in_order_and_a_hook_stops_the_run(tiny_run):
    loop, events, _, _ = tiny_run
    assert loop.step == 3 and loop.stop and sorted(loop.losses) == [1, 2, 3]
    # Metrics of step s reach the hooks while step s + 1 runs; stopping flushes the last ones before `end`.
    assert events == [("begin", 0), ("after_step", 1), ("metrics", 1, "mono"), ("after_step", 2),
                      ("metrics", 2, "cross"), ("after_step", 3), ("metrics", 3, "mono"), ("end", 3),
                      ("close", 3)]
    assert int(loop.state["step"]) == 3 and loop.trainer.trace_count == 1


def test_the_run_holds_one_copy_of_the_weights(tiny_run):
    """Beyond the train state (params + AdamW moments), what is alive during the run (a batch, metrics, the
    model's non-parameter state) is far smaller than the weights: no second copy of them is kept."""
    _, _, record, param_bytes = tiny_run
    assert len(record.extra_bytes) == 3
    assert all(extra < param_bytes / 4 for extra in record.extra_bytes), (record.extra_bytes, param_bytes)


def test_loss_history_is_a_compact_mapping_of_consecutive_steps():
    import sys

    from mlret.loop import LossHistory

    h = LossHistory(start=5)
    for step in range(6, 6 + 100_000):
        h[step] = step / 7
    assert len(h) == 100_000 and list(h)[:2] == [6, 7] and h[6] == 6 / 7 and h[100_005] == 100_005 / 7
    assert h == {s: s / 7 for s in range(6, 100_006)} and sorted(h)[-1] == 100_005
    h[6] = 1.5  # a step recorded again (the loop's last step is synced once more) replaces it
    assert h[6] == 1.5
    with pytest.raises(KeyError):
        h[5]
    with pytest.raises(KeyError, match="not the next step"):
        h[100_010] = 0.0
    assert sys.getsizeof(h._values) < 1.0 * 2**20  # 8 bytes a step, not a Python float and int per step
