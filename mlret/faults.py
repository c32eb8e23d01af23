"""Fault injection for robustness tests: poisoned batches on chosen steps (`config.train.inject_nan_steps`).

A poisoned batch carries one token id past any vocabulary; the embedding lookup (`jnp.take`, which fills
out-of-range rows with NaN) turns it into NaN embeddings, so the loss and the gradients of that step are NaN
exactly as with a real corrupt batch (a tokenizer and a model with different vocabularies, a bad record). The train
step's non-finite guard must then skip the update, the loop must count and log it, and N in a row must stop the run
with the last good checkpoint intact (tests/test_faults.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Larger than any vocabulary, and still an int32.
POISON_TOKEN_ID = 2**30


def parse_steps(spec: str, field: str = "config.train.inject_nan_steps") -> frozenset[int]:
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
