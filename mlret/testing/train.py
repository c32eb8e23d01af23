"""`python -m mlret.train` with the test tooling of `mlret.testing.faults` armed:

    python -m mlret.testing.train --config configs/x.py --workdir DIR [--inject_nan_steps=3,12] [--config.k=v ...]

`--inject_nan_steps` poisons those steps' batches (`InjectNaN`); the environment variable
MLRET_TEST_SIGKILL_AFTER_STEP=N makes the process SIGKILL itself after step N, its checkpoint writes done
(`KillAfterStep`). Everything else is mlret.train's command line, unchanged.
"""

from __future__ import annotations

from absl import app, flags

from mlret import train as T
from mlret.testing.faults import InjectNaN, KillAfterStep, parse_steps

_INJECT_NAN = flags.DEFINE_string("inject_nan_steps", "", "comma-separated steps whose batch is poisoned (NaN)")


def main(argv: list[str]) -> None:
    try:
        poisoned = parse_steps(_INJECT_NAN.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    kill = KillAfterStep.from_env()
    T.main(argv, hooks=[InjectNaN(poisoned), *([kill] if kill else [])])


if __name__ == "__main__":
    app.run(main, flags_parser=T.parse_flags)
