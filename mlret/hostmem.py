"""The host's memory allocator: which malloc serves this process and how many bytes it has handed out.

CPU training churns through large host buffers every step (XLA:CPU's temporaries, the attention scores of a
batch: hundreds of MiB each). glibc's malloc serves every request above 32 MiB with a fresh mmap and returns it
on free, so each step faults its pages in again and the kernel zeroes them; its per-thread arenas also keep freed
chunks, so resident memory drifts up over long runs while the memory in use stays flat. tcmalloc keeps and
reuses freed memory: on the 2-core machine of docs/benchmarks.md ("Host allocator") the padded MiniLM step at
batch 64 took 18.4 s instead of 31.9 s, and sentence-transformers' 19.1 s instead of 49.5 s. Preloading it is the
user's choice (`LD_PRELOAD=libtcmalloc_minimal.so.4`, Debian/Ubuntu package libtcmalloc-minimal4); mlret.train
names the allocator it runs under at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

# tcmalloc's shared-library names (ctypes.util.find_library), in the order `preload_hint` tries them.
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int | None:
    """Bytes the process's malloc has handed out and not got back, from the allocator that serves malloc here
    (`allocator()`): glibc's `mallinfo2` summed over its arenas (`uordblks` + `hblkhd` in mmap'd chunks),
    jemalloc's `stats.allocated` or tcmalloc's `generic.current_allocated_bytes` (either one preloaded with
    LD_PRELOAD); None for any other allocator. Python's small objects live in its own mmap'd arenas and are not
    in it: `sys.getallocatedblocks()` counts those."""
    name, fn = _allocator()
    return None if fn is None else int(fn())


def allocator() -> str:
    """Which malloc serves this process: "jemalloc" or "tcmalloc" (found through their own entry points, as
    LD_PRELOAD puts them before the C library), "glibc" (mallinfo2, glibc >= 2.33) or "unknown"."""
    return _allocator()[0]


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library (glibc's `mallinfo2` and `malloc_trim` live there)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@functools.cache
def _allocator() -> tuple[str, Any]:
    process = ctypes.CDLL(None)  # the symbols of the process as the dynamic linker resolves them
    size = ctypes.c_size_t
    if hasattr(process, "mallctl"):  # jemalloc: refresh its statistics ("epoch"), then read them
        mallctl = process.mallctl
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(size), ctypes.c_void_p, size]

        def jemalloc() -> int:
            epoch, value, n = ctypes.c_uint64(1), size(0), size(8)
            mallctl(b"epoch", ctypes.byref(epoch), ctypes.byref(n), ctypes.byref(epoch), 8)
            n = size(ctypes.sizeof(size))
            if mallctl(b"stats.allocated", ctypes.byref(value), ctypes.byref(n), None, 0):
                raise OSError("jemalloc: mallctl('stats.allocated') failed (built without statistics?)")
            return value.value

        return "jemalloc", jemalloc
    if hasattr(process, "MallocExtension_GetNumericProperty"):
        get = process.MallocExtension_GetNumericProperty
        get.argtypes = [ctypes.c_char_p, ctypes.POINTER(size)]

        def tcmalloc() -> int:
            value = size(0)
            if not get(b"generic.current_allocated_bytes", ctypes.byref(value)):
                raise OSError("tcmalloc: no generic.current_allocated_bytes property")
            return value.value

        return "tcmalloc", tcmalloc
    try:
        fn = libc().mallinfo2
    except (OSError, AttributeError):
        return "unknown", None
    fn.restype = _MallInfo2

    def glibc() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return "glibc", glibc


def preload_hint() -> str | None:
    """`LD_PRELOAD=<lib>` for the tcmalloc library installed on this machine, or None where there is none."""
    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return f"LD_PRELOAD={found}"
    return None


def startup_line(backend: str) -> str:
    """What mlret.train logs at start-up: the allocator, and on a CPU backend under glibc, how to preload
    tcmalloc if it is installed."""
    name = allocator()
    hint = preload_hint() if backend == "cpu" and name == "glibc" else None
    return (f"host allocator: {name}" + (f" (CPU steps with large batches run faster under tcmalloc: {hint}; "
                                         "mlret/hostmem.py)" if hint else ""))
