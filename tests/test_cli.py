"""jaxchat.runtime.cli: every `python -m jaxchat.X` sets its process up through cli.run, as its Setup declares, before
it reads its flags; a signal while the processes join is one line at once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxchat.runtime import xla_flags

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["train", "aot", "base_eval", "core_eval", "core_bundle", "dataset", "tok_train", "tok_eval", "export",
            "plan", "parity"]

# Each command's `python -m` entry with --help, in turn, from an environment without jaxchat's XLA flags: what it
# leaves in the environment is what its set-up did before argparse printed the help and exited.
ENTRIES = r"""
import os, runpy, sys, warnings
warnings.simplefilter("ignore", RuntimeWarning)  # runpy: a module imported by an earlier command, run as __main__
for name in sys.argv[1:]:
    for var in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        os.environ.pop(var, None)
    sys.argv = [f"jaxchat.{name}", "--help"]
    code = "returned"
    try:
        runpy.run_module(f"jaxchat.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    print("ENTRY", name, code, os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), os.environ.get("XLA_FLAGS", ""),
          file=sys.stderr, flush=True)
"""


def _env(base: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_flags.MEMORY_FRACTION_VAR)}
    return env | dict(JAXCHAT_BASE_DIR=str(base), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), COLUMNS="120") | extra


@pytest.mark.entry
def test_every_command_sets_its_process_up_through_cli_before_reading_flags(tmp_path):
    proc = subprocess.run([sys.executable, "-c", ENTRIES, *COMMANDS], capture_output=True, text=True, timeout=600,
                          env=_env(tmp_path), cwd=tmp_path)
    entries = {line.split()[1]: line.split()[2:] for line in proc.stderr.splitlines() if line.startswith("ENTRY ")}
    assert list(entries) == COMMANDS, proc.stderr[-3000:]
    for name, (code, fraction, *flags) in entries.items():
        assert code == "0", f"{name}: --help exited {code}"
        assert fraction == str(xla_flags.MEMORY_FRACTION), f"{name}: no GPU memory fraction set up"
        assert flags == xla_flags.merged("").split(), f"{name}: XLA flags {flags}"
    assert not os.listdir(tmp_path), "a --help wrote something"


def _command(name: str, base: Path, *argv: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"jaxchat.{name}", *argv], capture_output=True, text=True,
                          timeout=300, env=_env(base, **env), cwd=REPO)


@pytest.mark.slow
@pytest.mark.entry
def test_train_and_base_eval_enable_the_cache_then_join_from_their_flags_or_the_environment(tmp_path):
    """The compilation cache (its directory made) before the multi-process start, which reads train's flags and
    base_eval's environment: 2 processes without a coordinator is the start's one line. A dry run does neither."""
    need = "2 processes need --coordinator-address=HOST:PORT"
    runs = {"train": _command("train", tmp_path / "train", "--data=demo", "--num-processes=2", "--process-id=0"),
            "base_eval": _command("base_eval", tmp_path / "base_eval", "--model-tag=d4", "--eval=bpb",
                                  JAX_NUM_PROCESSES="2")}
    for name, proc in runs.items():
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {need}"), proc.stderr[-2000:]
        assert len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
        assert os.listdir(tmp_path / name) == ["jax_cache"]
    dry = _command("train", tmp_path / "dry", "--data=demo", "--dry-run", "--num-processes=2", "--process-id=0")
    assert dry.returncode == 0 and "--dry-run: vocabulary" in dry.stdout, dry.stderr[-2000:]
    assert not (tmp_path / "dry" / "jax_cache").exists()  # (the base directory itself: the tokenizer look-up)


@pytest.mark.slow
@pytest.mark.entry
def test_a_signal_while_joining_the_other_processes_is_one_line_at_once(tmp_path):
    """JAX's join blocks in C++, where a Python handler never runs: the signal is heard by a watcher thread, and the
    process says so and exits now, not when --init-timeout ends the join."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there
    proc = subprocess.Popen([sys.executable, "-m", "jaxchat.train", "--data=demo", f"--coordinator-address=127.0.0.1:"
                             f"{port}", "--num-processes=2", "--process-id=1", "--init-timeout=120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=REPO)
    time.sleep(10)  # imports done: joining (a signal before the join is one line as well)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=110)
    assert proc.returncode == 143 and len(err.splitlines()) == 1 and "SIGTERM" in err, err[-2000:]
    assert time.monotonic() - t0 < 30


CHOSEN = r"""
import jax
from jaxchat.runtime import cli
cli.run(lambda: print(jax.config.jax_platforms), setup=cli.Setup(compile_only=True))
"""


def test_a_compile_only_command_starts_no_accelerator():
    """jaxchat.aot's set-up: with JAX_PLATFORMS unset only the CPU starts, a GPU or TPU host's included."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHOSEN], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.split() == ["cpu"], proc.stderr[-2000:]
