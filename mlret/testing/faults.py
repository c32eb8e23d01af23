"""Fault injection for robustness tests, as loop hooks (`mlret.loop.Hook`).

`InjectNaN(steps)`: poisoned batches on chosen steps. A poisoned batch carries one token id past any vocabulary;
the embedding lookup (`jnp.take`, which fills out-of-range rows with NaN) turns it into NaN embeddings, so the loss
and the gradients of that step are NaN exactly as with a real corrupt batch (a tokenizer and a model with different
vocabularies, a bad record). The train step's non-finite guard must then skip the update, the loop must count and
log it, and N in a row must stop the run with the last good checkpoint intact (tests/test_faults.py).

`KillAfterStep(n)`: after step n, wait for the pending checkpoint writes and SIGKILL this process (the resume tests'
"crash at a known moment"; `python -m mlret.testing.train` arms it from MLRET_TEST_SIGKILL_AFTER_STEP).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping

import numpy as np

from mlret.loop import Hook, Loop

log = logging.getLogger("mlret.testing")

# Larger than any vocabulary, and still an int32.
POISON_TOKEN_ID = 2**30
KILL_ENV = "MLRET_TEST_SIGKILL_AFTER_STEP"


def parse_steps(spec: str, field: str = "--inject_nan_steps") -> frozenset[int]:
    """'5,6,7' -> {5, 6, 7}; '' -> {}. Steps are numbered as logged (the step whose update uses the batch)."""
    steps = set()
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"{field}={spec!r}: {part!r} is not a step number >= 1 (use e.g. '5,6,7')")
        steps.add(int(part))
    return frozenset(steps)


def poison_batch(local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of this process's batch slice whose first query carries an out-of-vocabulary token id."""
    out = {k: np.array(v, copy=True) for k, v in local.items()}
    out["query_ids"][0, 0] = POISON_TOKEN_ID
    return out


class InjectNaN(Hook):
    """Poison the batches of `steps` (numbered as logged)."""

    def __init__(self, steps: frozenset[int]) -> None:
        self.steps = steps

    def batch(self, loop: Loop, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if loop.step + 1 not in self.steps:
            return local
        log.warning("inject_nan_steps: poisoning the batch of step %d", loop.step + 1)
        return poison_batch(local)


class KillAfterStep(Hook):
    """After step `step`: every hook's pending work done (checkpoint writes), then SIGKILL to this process."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    @classmethod
    def from_env(cls) -> KillAfterStep | None:
        value = os.environ.get(KILL_ENV, "")
        return cls(int(value)) if value else None

    def after_step(self, loop: Loop) -> None:
        if loop.step == self.step:
            loop.wait()
            log.warning("%s=%d: killing this process with SIGKILL", KILL_ENV, self.step)
            os.kill(os.getpid(), signal.SIGKILL)
