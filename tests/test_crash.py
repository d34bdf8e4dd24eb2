"""Crash safety: SIGKILL and SIGTERM mid-run (also mid-save), resume, and get exactly the uninterrupted result."""

import json
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_RUN
from crash_harness import STEPS, final_state, interrupted_run, losses, prepare, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("crash")
    prepare(path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(base_dir):
    code, output = run(base_dir, "straight", resume=False)
    assert code == 0, output[-3000:]
    return losses([output]), final_state(base_dir, "straight")


def assert_identical(base_dir, tag, outputs, uninterrupted):
    ref_losses, ref_state = uninterrupted
    assert losses(outputs) == ref_losses
    state = final_state(base_dir, tag)
    assert sorted(state) == sorted(ref_state)
    for key in ref_state:
        np.testing.assert_array_equal(state[key], ref_state[key], err_msg=key)


@pytest.mark.entry
def test_sigkill_and_sigterm_then_resume_is_identical(base_dir, uninterrupted):
    outputs = interrupted_run(base_dir, "interrupted", [(3, signal.SIGKILL, 0.0), (6, signal.SIGTERM, 0.0)])
    assert any("Stopped by SIGTERM" in o and "--resume-from-step=last" in o for o in outputs)
    assert_identical(base_dir, "interrupted", outputs, uninterrupted)


def test_half_written_checkpoint_is_ignored(base_dir, uninterrupted):
    ckpt = base_dir / "base_checkpoints"
    shutil.copytree(ckpt / "straight", ckpt / "partial")
    # What a kill during the save of step 11 leaves behind: an unfinished temporary directory.
    shutil.copytree(ckpt / "partial" / str(STEPS), ckpt / "partial" / f"{STEPS + 1}.orbax-checkpoint-tmp-1234")
    for path in (ckpt / "partial" / f"{STEPS + 1}.orbax-checkpoint-tmp-1234" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[:5])
    from jaxchat.runtime.checkpoint import Checkpointer
    assert Checkpointer(str(ckpt / "partial")).resolve_step("last") == STEPS


@pytest.mark.entry
def test_corrupt_checkpoint_is_a_one_line_error(base_dir, uninterrupted):
    ckpt = base_dir / "base_checkpoints"
    shutil.copytree(ckpt / "straight", ckpt / "corrupt")
    for path in (ckpt / "corrupt" / str(STEPS)).rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])
    code, output = run(base_dir, "corrupt", resume=True)
    assert code == 2, output[-3000:]
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"{STEPS}" in error[0] and "Traceback" not in output


@pytest.mark.entry
def test_non_finite_loss_stops_without_saving(base_dir):
    env_cmd = [sys.executable, "-m", "jaxchat.train", *TINY_RUN, "--num-iterations=6", "--eval-every=-1",
               "--save-every=2", "--scalar-lr=1e38", "--model-tag=nan"]
    import os
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(base_dir), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(env_cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "non-finite" in proc.stderr and "stopped without saving" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.entry
def test_rollback_resume_moves_newer_checkpoints_aside(base_dir, uninterrupted):
    """--resume-from-step=5 after a run reached 10: steps 6..10 move aside (kept), the re-run ends identical."""
    ckpt = base_dir / "base_checkpoints"
    shutil.copytree(ckpt / "straight", ckpt / "rollback")
    code, output = run(base_dir, "rollback", resume=False, extra=("--resume-from-step=5",))
    assert code == 0, output[-3000:]
    assert "Resumed from step 5" in output and "Checkpoints newer than step 5 moved aside to" in output
    aside = list((ckpt / "rollback" / "rolled_back").iterdir())
    assert len(aside) == 1 and sorted(int(p.name) for p in aside[0].iterdir()) == list(range(6, STEPS + 1))
    ref_losses, ref_state = uninterrupted
    assert {s: v for s, v in losses([output]).items()} == {s: v for s, v in ref_losses.items() if s >= 5}
    state = final_state(base_dir, "rollback")
    for key in ref_state:
        np.testing.assert_array_equal(state[key], ref_state[key], err_msg=key)


@pytest.mark.entry
def test_ctrl_c_while_compiling_exits_130_with_one_line(base_dir):
    code, output = run(base_dir, "compiling", resume=False, kill_at_line="batch LR scale", sig=signal.SIGINT,
                       kill_delay=0.5)
    assert code == 130, output[-3000:]
    assert "Traceback" not in output and "Segmentation" not in output
    assert output.strip().splitlines()[-1] == "SIGINT before training started: exiting, nothing to save"
    assert not (base_dir / "base_checkpoints" / "compiling").exists()  # the lock released, nothing left


def test_locks_rotation_and_a_failed_final_evaluation_lose_nothing(base_dir, monkeypatch, capsys):
    """One in-process run covering: a stale lock (its process is gone) taken over; a step folder with nothing in it
    (a save cut short) skipped by --resume-from-step=last and moved aside; timed saves every step with --keep-last=2
    never taking a --save-every step; the final checkpoint committed before the final evaluation, whose failure (a
    validation shard gone) is one line; the lock released."""
    from jaxchat import train as train_mod
    from jaxchat.runtime.checkpoint import Checkpointer
    from jaxchat.runtime.common import UserError

    def vanished(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "shard_00002.parquet")

    ckpt = base_dir / "base_checkpoints" / "rotate"
    (ckpt / "9").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (ckpt / ".lock").write_text(json.dumps(dict(host=socket.gethostname(), pid=dead.pid, started="earlier")))
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setattr(train_mod, "evaluate_bpb", vanished)
    with pytest.raises(UserError) as e:
        train_mod.train(TINY_RUN + ["--num-iterations=6", "--eval-every=-1", "--save-every=3", "--resume-from-step=last",
                                    "--save-every-minutes=1e-9", "--keep-last=2", "--model-tag=rotate"])
    assert str(e.value).startswith("step 6: validation failed (FileNotFoundError") and "\n" not in str(e.value)
    assert "last complete: step 6" in str(e.value)
    out = capsys.readouterr().out
    assert f"Taking over the stale lock {ckpt}/.lock of process {dead.pid}" in out
    assert f"Skipping {ckpt}/9: not a complete checkpoint" in out
    assert [p.name for p in (ckpt / "rolled_back").glob("*/*")] == ["9"]
    assert [line.split()[3] for line in out.splitlines() if line.startswith("Saved checkpoint")] == \
        ["1", "2", "3", "4", "5", "6"]
    assert Checkpointer(str(ckpt)).steps() == [3, 4, 5, 6]  # step 3 (--save-every) kept, timed 1 and 2 rotated
    assert not [p for p in ckpt.iterdir() if "tmp" in p.name or p.name == ".lock"]


@pytest.mark.entry
def test_signals_during_evaluations_save_first_and_lose_nothing(base_dir, uninterrupted):
    """SIGHUP (treated as SIGTERM) during an --eval-every validation: it stops at its next batch, saves the step
    (not saved yet: no --save-every) and exits 129; the resume, Ctrl-C'd during the final evaluation (its checkpoint
    saved before), exits 130, and a second Ctrl-C while exiting adds at most one line, no traceback. The final state
    equals the uninterrupted run's."""
    from jaxchat.runtime.checkpoint import Checkpointer
    # Each validation reads 400 batches (a second or more on 2 cores): the signals, sent 0.15 s after the step line
    # that precedes it (the step boundary's stop check comes right after that line), land inside one.
    evals = ("--save-every=-1", "--eval-every=5", f"--eval-tokens={64 * 400}")
    code, first = run(base_dir, "evalstop", resume=True, extra=evals, signals=[("step 00004/", signal.SIGHUP, 0.15)])
    assert code == 129, first[-3000:]
    assert "Stopped by SIGHUP during the evaluation at step 5: checkpoint 5 saved in" in first
    assert Checkpointer(str(base_dir / "base_checkpoints" / "evalstop")).steps() == [5]
    code, second = run(base_dir, "evalstop", resume=True, extra=evals,
                       signals=[("step 00009/", signal.SIGINT, 0.15), ("Stopped by", signal.SIGINT, 0.0)])
    assert code in (130, -signal.SIGINT), second[-3000:]  # -2: it landed after Python restored the default handler
    lines = second.strip().splitlines()
    stopped = [i for i, line in enumerate(lines) if line.startswith("Stopped by SIGINT during the final evaluation: "
                                                                      f"checkpoint {STEPS} saved in")]
    assert stopped and len(lines) - stopped[0] <= 2, second[-3000:]
    assert all(line.startswith(("SIGINT while exiting", "second SIGINT")) for line in lines[stopped[0] + 1:])
    assert "Traceback" not in first + second and "KeyboardInterrupt" not in second
    assert_identical(base_dir, "evalstop", [first, second], uninterrupted)


@pytest.mark.entry
def test_a_signal_during_a_fresh_runs_first_validation_saves_step_0(base_dir):
    """A fresh run's step 0 has no checkpoint (resume_step named it as if it had one): SIGTERM during its first
    validation printed "checkpoint 0 saved" with nothing saved. Now step 0 is saved, and the line is true."""
    from jaxchat.runtime.checkpoint import Checkpointer
    # The plan's last line comes just before the loop; the step-0 validation reads 2000 batches (seconds).
    evals = ("--save-every=-1", "--eval-every=5", f"--eval-tokens={64 * 2000}")
    code, output = run(base_dir, "firsteval", resume=False, extra=evals,
                       signals=[("Total training FLOPs estimate", signal.SIGTERM, 1.0)])
    assert code == 143, output[-3000:]
    assert "Stopped by SIGTERM during the evaluation at step 0: checkpoint 0 saved in" in output, output[-3000:]
    assert Checkpointer(str(base_dir / "base_checkpoints" / "firsteval")).steps() == [0]
