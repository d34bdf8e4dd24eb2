"""glibc malloc set to keep freed blocks: applied in a fresh process, and off with JAXCHAT_MALLOC=0."""

import os
import subprocess
import sys

import pytest

# A fresh process: mallopt's settings are process-wide. It reports whether they were applied and how many page
# faults (minor, from the kernel's count) one more 64 MB buffer costs after the first was freed.
CODE = """
import ctypes, resource
from jaxchat.runtime import host_memory
applied = host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def write_buffer():
    p = libc.malloc(64 * 2**20); ctypes.memset(p, 1, 64 * 2**20); libc.free(p)
write_buffer()
before = faults(); write_buffer(); after = faults()
print(applied, after - before)
"""


def run(env_extra: dict) -> tuple[str, int]:
    env = dict(os.environ, **env_extra)
    done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    applied, faults = done.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_buffer_is_reused_without_page_faults():
    applied, faults = run({"JAXCHAT_MALLOC": "1"})  # conftest turns it off for the tests' runs
    assert applied == "True"
    assert faults < 100  # the freed 64 MB block is reused: no page to fault in
    applied, faults = run({"JAXCHAT_MALLOC": "0"})
    assert applied == "False"
    assert faults > 10_000  # glibc's default: a fresh mmap, one fault per 4 KB page (16384)
