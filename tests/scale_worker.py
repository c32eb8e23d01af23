"""One process of a multi-process (or single-process) training run for the scale tests.

    python tests/scale_worker.py --report OUT.json --config configs/smoke.py --workdir DIR
        [--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I] [--config.field=value ...]

It runs the real loop of `python -m mlret.train` (same flags, same `train()`), then writes what a test cannot
see from outside: the loss of every step this process ran, and a fingerprint of every shard of every parameter
and optimizer-state array on this process's devices (index in the global array, device, sha1 of the bytes), so
that a test can check that every replica of a replicated array is bitwise identical on every device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys

from mlret import config as config_lib
from mlret import train as T


def shard_fingerprints(tree) -> dict[str, list[list]]:
    import jax
    import numpy as np

    out = {}
    for path, arr in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = [
            [str(shard.index), int(shard.device.id), hashlib.sha1(np.asarray(shard.data).tobytes()).hexdigest()]
            for shard in arr.addressable_shards]
    return out


def main() -> None:
    args = sys.argv[1:]
    i = args.index("--report")
    report = args[i + 1]
    del args[i:i + 2]
    T.parse_flags([sys.argv[0], *args])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    config = T._CONFIG.value
    config.workdir = T._WORKDIR.value or config.workdir
    T.set_xla_cpu_flags(int(config.mesh.simulated_cpu_devices))  # as mlret.train does

    import jax

    from mlret import parallel

    parallel.initialize_distributed(T._COORDINATOR.value, T._NUM_PROCESSES.value, T._PROCESS_ID.value)
    config_lib.validate(config, devices=jax.device_count(), processes=jax.process_count())
    result = T.train(config, config.workdir)
    state = result.state
    with open(report, "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "device_count": jax.device_count(), "start_step": result.start_step, "end_step": result.end_step,
                   "losses": {str(k): v for k, v in result.losses.items()},
                   "params": shard_fingerprints(state["params"]),
                   "opt_state": shard_fingerprints(state["opt_state"])}, f)


if __name__ == "__main__":
    main()
