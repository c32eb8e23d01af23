"""A real leak of real memory, measured in a fresh process (tests/test_soak.py): run with a JSON object of
`rss_run`'s keyword arguments, it warms the allocator with one run without a leak, then prints the (RSS samples,
heap samples) of the run asked for as JSON. A fresh process, so that the threads and memory of the test session
(earlier tests' pools, arrays, caches) cannot move its RSS."""

from __future__ import annotations

import json
import sys
import time

from mlret.hostmem import heap_in_use


def rss_run(steps: int, leak_bytes_per_step: int, leak_from: int = 0, shrink_bytes: int = 0,
             leak_with: str = "mmap") -> tuple[list[tuple[float, int, int]], list[tuple[float, int, int]]]:
    """(RSS samples, heap samples), each (seconds, step, bytes), of this process over `steps` steps of allocation
    churn (a step's transient buffers, made and freed), keeping `leak_bytes_per_step` more each step from step
    `leak_from` on: a real leak of real memory, sampled the way ResourceMonitor samples (psutil RSS and
    `heap_in_use`). With `leak_with="mmap"` the leak takes fresh pages from the kernel (16 steps' worth at a time,
    written through), so memory this process freed earlier cannot hide it; with "malloc" it is buffers from
    malloc (1 KiB bytearrays), as a native or Python leak would be. With `shrink_bytes`, that much resident
    memory is held at the start and handed back to the kernel evenly over the first half of the steps (a falling
    warm-up transient, as allocator arenas shrink)."""
    import mmap

    import psutil

    chunk = 2**20
    held = []
    for _ in range(shrink_bytes // chunk):
        block = mmap.mmap(-1, chunk)
        block.write(b"\x01" * chunk)
        held.append(block)
    release_every = max(1, (steps // 2) // max(len(held), 1))
    proc, kept, samples, heap, t0 = psutil.Process(), [], [], [], time.time()
    for step in range(1, steps + 1):
        scratch = [bytearray(4096) for _ in range(16)]  # transient, like a step's host-side buffers
        del scratch
        if held and step % release_every == 0:
            held.pop().close()
        if leak_bytes_per_step and step > leak_from:
            if leak_with == "malloc":
                kept.append(bytearray(b"\x01" * leak_bytes_per_step))
            elif step % 16 == 0:
                block = mmap.mmap(-1, 16 * leak_bytes_per_step)
                block.write(b"\x01" * (16 * leak_bytes_per_step))  # resident: every page is written
                kept.append(block)
        if step % 20 == 0:
            now = time.time() - t0
            samples.append((now, step, proc.memory_info().rss))
            heap.append((now, step, heap_in_use()))
    for block in kept + held:
        if isinstance(block, mmap.mmap):
            block.close()
    return samples, heap


if __name__ == "__main__":
    kwargs = json.loads(sys.argv[1])
    rss_run(kwargs["steps"], 0)  # warm the allocator's arenas, as the soak's warm-up does
    print(json.dumps(rss_run(**kwargs)))
