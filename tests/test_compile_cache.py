"""JAX's persistent compilation cache: a second start loads every program from it (JAX's own cache log and the
directory say so); corrupt entries, an unusable directory and failing writes are one line and a compile."""

import os
import subprocess
import sys

import jax
import pytest

from conftest import TINY_RUN
from crash_harness import prepare

from jaxchat.runtime import compile_cache
from jaxchat.training.config import parse_flags

TINY = TINY_RUN + ["--num-iterations=2", "--eval-every=-1", "--tensorboard=false"]  # a step and validation
HIT, MISS = "Persistent compilation cache hit for '", "PERSISTENT COMPILATION CACHE MISS for '"
WARNING = "warning: JAX compilation cache: "


def entries(cache: str) -> dict[str, int]:
    """Entry file name -> inode (a rewrite is a rename of a new file: a new inode)."""
    return {name: os.stat(os.path.join(cache, name)).st_ino for name in os.listdir(cache)
            if name.endswith(compile_cache.SUFFIX)}


def logged(output: str, kind: str) -> set[str]:
    """Cache keys JAX's compiler logged as hits or misses (its DEBUG log, on with JAX_DEBUG_LOG_MODULES)."""
    return {line.rsplit("with key '", 1)[1].rstrip("'") for line in output.splitlines() if kind in line}


def train(base, cache, tag: str) -> str:
    """Output of `python -m jaxchat.train` on the tiny demo run, with JAX's compiler logging cache hits and misses."""
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(base), XLA_FLAGS="--xla_force_host_platform_device_count=1",
               WANDB_MODE="disabled", JAX_DEBUG_LOG_MODULES="jax._src.compiler")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "jaxchat.train", *TINY, f"--model-tag={tag}",
                           f"--compile-cache={cache}"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.entry
def test_second_start_loads_every_program_from_the_cache(tmp_path):
    prepare(tmp_path)
    cache = str(tmp_path / "cache")
    cold = train(tmp_path, cache, "cold")
    written = entries(cache)
    assert len(written) >= 2 and any("train_step" in name for name in written), sorted(written)
    assert {key + compile_cache.SUFFIX for key in logged(cold, MISS)} == set(written) and not logged(cold, HIT)
    warm = train(tmp_path, cache, "warm")
    # every program compiled in the first run is read back, none is compiled or written again
    assert {key + compile_cache.SUFFIX for key in logged(warm, HIT)} == set(written), warm[-3000:]
    assert not logged(warm, MISS) and entries(cache) == written
    assert WARNING not in cold + warm
    steps = [[line.split("| dt")[0] for line in out.splitlines() if line.startswith(("step ", "Step "))]
             for out in (cold, warm)]
    assert steps[0] == steps[1] and len(steps[0]) == 3  # the loaded programs compute what the compiled ones did


PROGRAM = """
import sys, jax, jax.numpy as jnp
from jaxchat.runtime import compile_cache
{patch}
compile_cache.enable(sys.argv[1])
print(float(jax.jit(lambda x: (jnp.sin(x) * 3).sum())(jnp.arange(8.0))))
from jax._src import compilation_cache
print(type(compilation_cache._cache).__name__)
"""


def jit_once(cache, patch: str = "") -> tuple[list[str], list[str]]:
    """(stdout lines, stderr lines) of a process that enables the cache and compiles one small program."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", PROGRAM.format(patch=patch), str(cache)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines(), proc.stderr.splitlines()


@pytest.mark.slow
def test_corrupt_entries_are_one_line_then_compiled_and_replaced(tmp_path):
    cache = tmp_path / "cache"
    (value, kind), err = jit_once(cache)
    assert kind == "AtomicFileCache" and not err, err  # jax wrote through jaxchat's atomic cache
    for path in cache.glob("*" + compile_cache.SUFFIX):
        path.write_bytes(b"not a compiled program" * 7)
    out, err = jit_once(cache)
    assert out[0] == value and len(err) == 1 and err[0].startswith(WARNING) and "Error reading" in err[0], err
    assert all(b"not a compiled program" not in p.read_bytes() for p in cache.glob("*" + compile_cache.SUFFIX))
    assert jit_once(cache) == ([value, kind], [])  # repaired: read back without a word


@pytest.mark.slow
def test_an_unusable_directory_is_one_line_and_no_cache(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out, err = jit_once(blocker / "cache")  # a regular file where a directory should be
    assert len(err) == 1 and err[0].startswith(WARNING + "cannot write to") and out[1] == "NoneType", err


@pytest.mark.slow
def test_failed_writes_are_one_line_and_leave_no_partial_entry(tmp_path):
    cache = tmp_path / "cache"
    full = ("import os, errno\n"
            "def replace(*a): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "os.replace = replace")
    out, err = jit_once(cache, patch=full)  # several programs fail to be written: still one line
    assert len(err) == 1 and err[0].startswith(WARNING) and "No space left" in err[0], err
    assert os.listdir(cache) == []  # neither a truncated entry nor a temporary file


@pytest.fixture
def jax_cache_config():
    """Leave JAX's cache configuration and warnings hook as they were."""
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
    saved = {name: getattr(jax.config, name) for name in names}
    import warnings
    hook = warnings.showwarning
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    warnings.showwarning = hook
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()


def test_flag_places_and_off(tmp_path, monkeypatch, jax_cache_config):
    assert parse_flags([]).compile_cache == "auto"
    assert parse_flags(["--compile-cache=off"]).compile_cache == "off"
    assert parse_flags(["--config=configs/demo.py", "--compile-cache="]).compile_cache == ""
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compile_cache.resolve("auto") == str(tmp_path / "base" / "jax_cache") == compile_cache.resolve(None)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    assert compile_cache.resolve("auto") == str(tmp_path / "theirs")
    assert compile_cache.resolve(str(tmp_path / "mine")) == str(tmp_path / "mine")
    for off in ("", "off", "None", " none "):
        assert compile_cache.resolve(off) is None
    assert compile_cache.enable("off") is None and not jax.config.jax_enable_compilation_cache
    assert compile_cache.enable(None) == str(tmp_path / "theirs") and jax.config.jax_enable_compilation_cache
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "theirs") and os.path.isdir(tmp_path / "theirs")


GPU_PROGRAM = """
import sys
from jaxchat import aot
from jaxchat.runtime import compile_cache
compile_cache.enable(sys.argv[1])
aot.compile_for_target(["--depth=2", "--max-seq-len=256", "--total-batch-size=2048", "--device-batch-size=2"],
                       target="h100", devices=2)
"""


@pytest.mark.slow
@pytest.mark.skipif(not any(__import__("importlib").util.find_spec(p) for p in ("jax_cuda12_plugin",
                                                                                "jax_cuda13_plugin")),
                    reason="the CUDA plugin is not installed: pip install -e \".[cuda12]\"")
def test_a_gpu_step_with_cudnn_attention_has_the_same_key_in_every_process(tmp_path):
    """cuDNN attention's custom_partitioning writes a Python address into the program; left out of the key, two
    processes compiling the same H100 step (jaxchat.aot's compile, no GPU) name the same entry, so a relaunch on GPUs
    finds it. (A compile-only client cannot load the entry: one line, then it compiles.)"""
    cache = tmp_path / "cache"
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(tmp_path))
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", GPU_PROGRAM, str(cache)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert len(entries(str(cache))) == 1  # one program, one key: the second process looked up the first's entry
    assert sum(WARNING in line for line in done.stderr.splitlines()) == 1
