"""jaxchat.faults' contract: while training a signal becomes a stop request at a step boundary (the shell's exit
code); before training, or at a second Ctrl-C, it ends the process at once with one line, after `on_exit`."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jaxchat.faults import SaveTimer, StopRequest, any_process


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_while_training_a_signal_is_a_stop_request(signum, code, capsys):
    before = signal.getsignal(signum)
    request = StopRequest()
    try:
        request.training = True
        assert not request.requested()
        os.kill(os.getpid(), signum)  # the Python handler runs before the next bytecode
        assert request.requested() and request.signum == signum and request.exit_code == code
        assert f"Received {signal.Signals(signum).name}: finishing this step" in capsys.readouterr().out
    finally:
        request.restore_handlers()
    assert signal.getsignal(signum) is before
    request.restore_handlers()  # twice is harmless (train() restores on every exit path)


def run(body: str) -> subprocess.CompletedProcess:
    script = "import os, signal, time\nfrom jaxchat.faults import StopRequest\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_before_training_a_signal_exits_at_once_after_on_exit():
    proc = run("""
        request = StopRequest()
        request.on_exit.append(lambda: print("lock released", flush=True))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # e.g. compiling: the watcher thread ends the process meanwhile
        print("not reached")
    """)
    assert proc.returncode == 143 and proc.stdout.strip() == "lock released"
    assert proc.stderr.strip() == "SIGTERM before training started: exiting, nothing to save"


def test_a_second_ctrl_c_exits_without_waiting_for_the_save():
    proc = run("""
        request = StopRequest()
        request.training = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        print("first:", request.signum == signal.SIGINT, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
        print("not reached")
    """)
    assert proc.returncode == 130 and "first: True" in proc.stdout and "not reached" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("second SIGINT: exiting without waiting for the save")


def test_save_timer():
    assert not SaveTimer(-1).due() and not SaveTimer(0).due()  # off
    timer = SaveTimer(0.05 / 60)  # 50 ms
    assert not timer.due()
    time.sleep(0.06)
    assert timer.due()
    timer.reset()
    assert not timer.due()


def test_any_process_is_the_flag_itself_in_one_process():
    assert any_process(True) is True and any_process(False) is False
