"""The recommended GPU XLA flags: merged under the user's own, and known to the installed jaxlib."""

import os
import subprocess
import sys

import pytest

from jaxchat.runtime import xla_flags


def test_user_flags_win_and_defaults_fill_in():
    user = "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=true"
    flags = xla_flags.merged(user).split()
    assert flags[:2] == user.split()  # kept first and unchanged
    assert "--xla_gpu_enable_triton_gemm=false" not in flags
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert len(flags) == 2 + len(xla_flags.GPU_FLAGS) - 1
    assert xla_flags.merged("").split() == [f"--{k}={v}" for k, v in xla_flags.GPU_FLAGS.items()]


def start_backend(env: dict) -> subprocess.CompletedProcess:
    code = ("import os; from jaxchat.runtime import xla_flags; xla_flags.apply(); import jax; "
            "jax.numpy.zeros(1).block_until_ready(); print(os.environ['XLA_FLAGS'])")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_installed_jaxlib_knows_every_flag():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    done = start_backend(env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == xla_flags.merged("").split()
    # The check can fail: XLA aborts on a flag it does not know.
    bogus = start_backend(dict(env, XLA_FLAGS="--xla_gpu_no_such_flag_in_any_version=true"))
    assert bogus.returncode != 0 and "no_such_flag" in bogus.stderr


@pytest.mark.slow
def test_opt_out():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAXCHAT_XLA_FLAGS="0")
    done = start_backend(env)
    assert done.returncode == 0 and done.stdout.strip() == ""


def test_gpu_memory_fraction_is_set_unless_the_user_set_one(monkeypatch):
    """JAX would take 75% of a GPU: jaxchat asks for MEMORY_FRACTION; the user's fraction or preallocation wins."""
    for var in (xla_flags.MEMORY_FRACTION_VAR, "XLA_PYTHON_CLIENT_PREALLOCATE", "JAXCHAT_XLA_FLAGS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    xla_flags.apply()
    assert os.environ[xla_flags.MEMORY_FRACTION_VAR] == str(xla_flags.MEMORY_FRACTION) and xla_flags.MEMORY_FRACTION > 0.75
    monkeypatch.setenv(xla_flags.MEMORY_FRACTION_VAR, "0.5")
    xla_flags.apply()
    assert xla_flags.memory_fraction() == 0.5
    monkeypatch.delenv(xla_flags.MEMORY_FRACTION_VAR)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    xla_flags.apply()
    assert xla_flags.MEMORY_FRACTION_VAR not in os.environ
