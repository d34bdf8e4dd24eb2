"""Keep freed host memory in the process, so XLA:CPU's large per-step buffers are not page-faulted in afresh.

XLA:CPU allocates each step's intermediate buffers with malloc and frees them when the step ends: at the demo's shape
the (tokens, vocab) logits and their gradient are 64 MB each, at nanochat's runs/runcpu.sh shape 2 GB. glibc serves
every block over its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on free, so every step pays one
page fault per 4 KB it writes: an elementwise pass over 64 MB took 19 ms instead of 5 ms on the 2-core CPU. With mmap
off, one arena and no trimming, freed blocks go back to the heap and are reused by the next step. The process keeps
its peak footprint (what a training process holds anyway), and with one arena its compile threads contend: a tiny
run that is all compiling takes 14 s instead of 11.5 s. GPU hosts keep glibc's defaults (the large buffers live on
the device); JAXCHAT_MALLOC=0 keeps them anywhere.
"""

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def _gpu_host() -> bool:
    """A GPU host: a jaxlib GPU plugin installed and a GPU driver's device node present (the plugin alone is not
    enough: CPU machines install it to compile for GPUs that are not there, jaxchat.aot). The checks are
    jaxchat.runtime.backend's, which also decide whether the plugin starts."""
    from jaxchat.runtime import backend

    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    gpus = {"cuda", "rocm"} & backend.installed_plugins()
    return any(backend.device_present(p) for p in gpus)


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks (call at process start, before threads allocate); True if applied."""
    if os.environ.get("JAXCHAT_MALLOC", "1") == "0" or _gpu_host():
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return False
    # arenas first: a thread's own arena cannot grow past 64 MB without mmap
    return all(mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)))
