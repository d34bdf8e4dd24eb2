"""Run a tiny training in a subprocess, interrupt it, resume it, and compare with an uninterrupted run.

Used by tests/test_crash.py (a few fixed interruptions) and bench/crash_soak.py (many random ones).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from conftest import TINY_RUN, hangup_default

STEPS = 10
TINY = TINY_RUN + [f"--num-iterations={STEPS}", "--eval-every=-1", "--save-every=1", "--tensorboard=false"]
STEP_LINE = re.compile(r"^step (\d+)/\d+ .*\| loss: ([0-9.]+) \|")


def prepare(base_dir: Path) -> None:
    """Build the demo corpus and tokenizer once, so every run starts equally fast."""
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(base_dir))
    for module in ("jaxchat.dataset", "jaxchat.tok_train"):
        subprocess.run([sys.executable, "-m", module, "--demo"], env=env, check=True, timeout=300, capture_output=True)


def start(base_dir: Path, tag: str, resume: bool, extra: tuple = ()) -> subprocess.Popen:
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(base_dir), XLA_FLAGS="--xla_force_host_platform_device_count=1",
               WANDB_MODE="disabled")
    cmd = [sys.executable, "-u", "-m", "jaxchat.train", *TINY, f"--model-tag={tag}"]
    cmd += (["--resume-from-step=last"] if resume else []) + list(extra)
    with hangup_default():
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def run(base_dir: Path, tag: str, *, resume: bool, kill_after_step: int | None = None, sig: int = signal.SIGKILL,
        kill_delay: float = 0.0, timeout: float = 300, extra: tuple = (),
        kill_at_line: str | None = None, signals: tuple = ()) -> tuple[int, str]:
    """(exit code, output) of one run; with kill_after_step, `sig` is sent kill_delay seconds after that step line
    (or after the first line containing kill_at_line); `signals`: (text, signal, delay) sent in turn, each `delay`
    seconds after the first line containing its text."""
    proc = start(base_dir, tag, resume, extra)
    lines, deadline, kill_at = [], time.monotonic() + timeout, None
    signals = list(signals)
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        while proc.poll() is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line:
                lines.append(line)
                match = STEP_LINE.match(line)
                if kill_after_step is not None and match and int(match.group(1)) >= kill_after_step and kill_at is None:
                    kill_at = time.monotonic() + kill_delay
                if kill_at_line is not None and kill_at_line in line and kill_at is None:
                    kill_at = time.monotonic() + kill_delay
                if signals and signals[0][0] in line:
                    _, signum, delay = signals.pop(0)
                    time.sleep(delay)
                    os.killpg(proc.pid, signum)
            else:
                time.sleep(0.005)
            if kill_at is not None and time.monotonic() >= kill_at:
                os.killpg(proc.pid, sig)
                kill_at = float("inf")
        if proc.poll() is None:
            raise TimeoutError(f"training run {tag} did not finish in {timeout} s")
        lines += proc.stdout.readlines()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, "".join(lines)


def losses(outputs: list[str]) -> dict[int, str]:
    """Printed (EMA) loss of every step; a step re-run after a resume must print the same value."""
    seen: dict[int, str] = {}
    for output in outputs:
        for line in output.splitlines():
            if match := STEP_LINE.match(line):
                step, loss = int(match.group(1)), match.group(2)
                assert seen.get(step, loss) == loss, f"step {step} printed loss {seen[step]} then {loss}"
                seen[step] = loss
    return seen


def final_state(base_dir: Path, tag: str) -> dict[str, np.ndarray]:
    """Parameters and optimizer state of the final checkpoint, flattened."""
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(base_dir / "base_checkpoints" / tag) as mgr:
        assert mgr.latest_step() == STEPS, f"{tag}: latest checkpoint {mgr.latest_step()}, expected {STEPS}"
        restored = mgr.restore(STEPS, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                               opt_state=ocp.args.StandardRestore()))
    flat = {}
    for item in ("params", "opt_state"):
        for key, value in ocp.tree.to_flat_dict(restored[item]).items():
            flat[f"{item}/{key}"] = np.asarray(value)
    return flat


def interrupted_run(base_dir: Path, tag: str, interruptions: list[tuple[int, int, float]],
                    timeout: float = 300) -> list[str]:
    """Run to the end through (after_step, signal, delay) interruptions, resuming after each; all outputs."""
    outputs = []
    for after_step, sig, delay in interruptions:
        code, output = run(base_dir, tag, resume=True, kill_after_step=after_step, sig=sig, kill_delay=delay,
                           timeout=timeout)
        outputs.append(output)
        if code == 0:  # finished before the signal landed
            return outputs
        expected = {-signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGTERM}
        assert code in expected, f"run ended with code {code}:\n{output[-3000:]}"
    code, output = run(base_dir, tag, resume=True, timeout=timeout)
    assert code == 0, output[-3000:]
    return outputs + [output]
