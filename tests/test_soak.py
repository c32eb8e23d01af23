"""A short soak through the same code as `scripts/soak.py memory` (the 10,000-step run is in docs/robustness.md):
the real loop in process with periodic evaluation, watched by the `mlret.testing.soak.ResourceMonitor` hook,
compiles nothing after the first evaluation and keeps resident memory within 5% after it; and the soak's memory
criterion (`memory_slope`, `memory_verdict`) against real leaks of resident memory."""

import sys
import time

import pytest
from scale_runs import REPO

from mlret.hostmem import heap_in_use
from mlret.testing.soak import MAX_SLOPE_MIB_PER_1000_STEPS, memory_slope, memory_verdict


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
    # RSS every 0.1 s: the 20 steps after step 40 take about 2 s of the tiny model here, and the slope of the
    # second half needs at least 4 samples.
    out = soak.memory_soak(config, tmp_path / "run", warmup_step=eval_every, counters_every_s=0.5, interval_s=0.1)
    assert out["end_step"] == steps and out["evals"] == [20, 40, 60]
    # The first evaluation compiled its encoders (and the step before it compiled); later ones reuse them.
    assert out["compiles_total"] > 0
    assert out["compiles_after_warmup"] == [], out["compiles_after_warmup"]
    assert out["growth"]["samples"] >= 4
    assert out["growth"]["growth"] <= 0.05, out["growth"]
    assert out["growth"]["slope_mib_per_1000_steps"] == memory_slope(out["samples"], eval_every)
    assert out["counters"]["live_arrays_last"] > 0  # the exact counters were sampled during the run
    assert out["growth"]["verdict"]["heap_slope_after_warmup"] is not None or heap_in_use() is None


def _rss_run(steps: int, leak_bytes_per_step: int, **kwargs) -> tuple[list, list]:
    """`tests/rss_leak.py`'s (RSS samples, heap samples) of `steps` steps leaking `leak_bytes_per_step` a step,
    measured in a fresh process after one warm-up run there (see that module)."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, str(REPO / "tests" / "rss_leak.py"),
                          json.dumps({"steps": steps, "leak_bytes_per_step": leak_bytes_per_step, **kwargs})],
                         capture_output=True, text=True, timeout=300, check=True)
    rss, heap = json.loads(out.stdout.strip().splitlines()[-1])
    return [tuple(r) for r in rss], [tuple(h) for h in heap]


def test_memory_criterion_fails_a_leak_of_1_mib_per_1000_steps_and_passes_none():
    steps, warmup = 30_000, 3_000
    flat = memory_slope(_rss_run(steps, 0)[0], warmup)
    leaking = memory_slope(_rss_run(steps, 1024)[0], warmup)  # 1 KiB a step: 1000/1024 MiB per 1000 steps
    assert flat <= MAX_SLOPE_MIB_PER_1000_STEPS, flat
    assert leaking > MAX_SLOPE_MIB_PER_1000_STEPS, leaking
    assert 0.8 <= leaking <= 1.3, leaking  # the fit measures the leak itself, not noise


def test_memory_verdict_catches_a_leak_that_a_falling_warm_up_hides():
    """Resident memory that falls by 64 MiB over the first half (a warm-up transient: arenas handing pages back)
    while malloc'd buffers leak 1 KiB a step: the RSS slope after warm-up passes (the fall hides the leak), the
    slope of malloc's bytes in use is the leak, and the verdict fails; without the leak it passes."""
    if heap_in_use() is None:
        pytest.skip("heap_in_use needs glibc's mallinfo2")
    steps, warmup = 30_000, 3_000
    rss, heap = _rss_run(steps, 1024, shrink_bytes=64 * 2**20, leak_with="malloc")
    hidden = memory_verdict(rss, warmup, heap)
    assert hidden["slope_after_warmup"] <= MAX_SLOPE_MIB_PER_1000_STEPS, hidden  # RSS alone would pass it
    assert 0.8 <= hidden["heap_slope_after_warmup"] <= 1.3, hidden
    assert not hidden["passed"], hidden
    rss, heap = _rss_run(steps, 0, shrink_bytes=64 * 2**20)
    clean = memory_verdict(rss, warmup, heap)
    assert abs(clean["heap_slope_after_warmup"]) <= 0.1 and clean["passed"], clean


def test_resource_monitor_keeps_no_array_alive():
    """The monitor's counting of live jax arrays must not itself keep arrays alive (a list of them held across
    samples is counted into the next one, and so on): arrays made and dropped while it samples every 10 ms are
    freed, and its counts stay flat."""
    import types

    import jax.numpy as jnp

    from mlret.testing.soak import ResourceMonitor

    jnp.ones(4).block_until_ready()  # compile outside the measurement
    baseline = len(jax_live())
    mon = ResourceMonitor(interval_s=0.005, counters_every_s=0.0)
    mon.begin(types.SimpleNamespace(step=0))
    try:
        deadline = time.time() + 30  # at least 60 samples, however loaded the machine
        while len(mon.counters) < 60 and time.time() < deadline:
            x = jnp.ones(1024) * 2.0
            x.block_until_ready()
            del x
            time.sleep(0.002)
    finally:
        mon.close(types.SimpleNamespace(step=0))
    counts = [c[2] for c in mon.counters]
    assert len(counts) >= 60, len(counts)
    assert len(jax_live()) <= baseline + 1, (baseline, len(jax_live()))
    assert max(counts) <= baseline + 3, (baseline, max(counts))


def jax_live():
    import jax

    return jax.live_arrays()


@pytest.mark.parametrize("name, library", [("glibc", None), ("jemalloc", "jemalloc"),
                                           ("tcmalloc", "tcmalloc_minimal")])
def test_heap_in_use_reads_the_allocator_that_serves_malloc(name, library):
    """Under LD_PRELOAD'ed jemalloc or tcmalloc, glibc's mallinfo2 would count glibc's idle arenas: the count must
    come from the allocator in use. A 64 MiB numpy buffer shows in it, and leaves it when freed."""
    import ctypes.util
    import json
    import os
    import subprocess

    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if library is not None:
        found = ctypes.util.find_library(library)
        if found is None:
            pytest.skip(f"lib{library} is not installed (Debian: libjemalloc2, libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = found
    script = ("import json, numpy as np\n"
              "from mlret.hostmem import allocator, heap_in_use\n"
              "before = heap_in_use(); x = np.ones(2**23); held = heap_in_use(); del x\n"
              "print(json.dumps([allocator(), before, held, heap_in_use()]))")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    got, before, held, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == name
    mib = 2**20
    assert abs((held - before) / mib - 64) < 1, (before, held)
    assert abs((after - before) / mib) < 1, (before, after)
