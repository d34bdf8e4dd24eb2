"""Shared test setup: 8 host devices for mesh tests, offline WandB, the reference fixtures' location."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# jaxchat's GPU flags, as `python -m jaxchat.train` sets them: XLA reads them once, when the process's first backend
# starts, and tests/test_aot.py compiles for H100s in this process (CPU compiles ignore them)
from jaxchat.runtime import xla_flags  # noqa: E402

xla_flags.apply()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# glibc's default malloc in the runs the tests start: jaxchat.runtime.host_memory's one arena costs the compile threads
# about 2.5 s per tiny run (11.5 s against 14 s) and the tests' steps are too small to gain from it
os.environ.setdefault("JAXCHAT_MALLOC", "0")

import contextlib  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
LOCAL_FIXTURES = Path(__file__).resolve().parent / "fixtures"


# A tiny training run on the demo corpus (seconds on a CPU); tests append their horizon and overrides (last flag wins).
TINY_RUN = ["--data=demo", "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=1",
            "--total-batch-size=1024", "--eval-tokens=1024", "--core-metric-every=-1", "--sample-every=-1"]


@contextlib.contextmanager
def hangup_default():
    """Around starting a run that a test sends SIGHUP: pytest may itself run under nohup, whose ignored SIGHUP the run
    would inherit (jaxchat leaves an ignored SIGHUP ignored). Not a preexec_fn: that forks a multithreaded process."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def moved(ours: np.ndarray, ref: np.ndarray, start: np.ndarray, exclude: int = 0) -> float:
    """‖ours − ref‖ / ‖ref − start‖ (how far from the reference, relative to how far the reference moved), leaving
    out the `exclude` largest elementwise errors."""
    err = np.sort(np.abs(ours.astype(np.float64) - ref).ravel())
    return float(np.linalg.norm(err[:err.size - exclude]) / np.linalg.norm(ref.astype(np.float64) - start))


def shared_fixture(name: str) -> Path:
    """Path of a file in ../shared/fixtures, or skip the test with the reason."""
    path = SHARED_FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not found: clone the repo beside its shared/ folder to run parity tests")
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A fresh $JAXCHAT_BASE_DIR for the module's runs (test files with their own layout override it)."""
    path = tmp_path_factory.mktemp("jaxchat_base")
    old = os.environ.get("JAXCHAT_BASE_DIR")
    os.environ["JAXCHAT_BASE_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["JAXCHAT_BASE_DIR"]
    else:
        os.environ["JAXCHAT_BASE_DIR"] = old


@pytest.fixture(autouse=True)
def _matmul_precision_restored():
    """Put jax's default matmul precision back after each test: the float32 parity checks (parity.main, base_eval
    --dtype=float32) set it to "highest" process-wide, as their commands should, and a later test in the same worker
    would inherit it (XLA:TPU's Mosaic refuses splash attention's bf16 dots at "highest")."""
    import jax
    before = jax.config.jax_default_matmul_precision
    yield
    jax.config.update("jax_default_matmul_precision", before)


def wait_for_handler(pid: int, signum: int, timeout: float = 60.0) -> None:
    """Wait until process `pid` catches `signum` (Linux: SigCgt in /proc/PID/status), so a signal sent next meets the
    command's handler, not the default action during its imports."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} never caught signal {signum}")
