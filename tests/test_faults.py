"""jaxchat.runtime.faults' contract: while training a signal (SIGTERM, SIGINT, SIGHUP) becomes a stop request at a step
boundary or an evaluation's next batch (the shell's exit code); before training, after the final save, while exiting,
or at a second Ctrl-C, it ends the process at once with one line, after `on_exit`."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import hangup_default
from jaxchat.runtime import faults
from jaxchat.runtime.faults import SaveTimer, Stopped, StopRequest, any_process


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_while_training_a_signal_is_a_stop_request(signum, code, capsys):
    if signal.getsignal(signum) is signal.SIG_IGN:
        pytest.skip(f"pytest runs with {signal.Signals(signum).name} ignored (nohup)")
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


def test_an_ignored_signal_stays_ignored():
    """Under `nohup` SIGHUP is ignored: the run must survive the terminal closing, not stop."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    request = StopRequest()
    try:
        request.training = True
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGHUP)
        assert request.signum is None and not request.requested()
    finally:
        request.restore_handlers()
        signal.signal(signal.SIGHUP, before)


def run(body: str) -> subprocess.CompletedProcess:
    script = "import os, signal, time\nfrom jaxchat.runtime.faults import StopRequest\n" + textwrap.dedent(body)
    with hangup_default():
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("signum, finished, line", [
    (signal.SIGTERM, "", "SIGTERM before training started: exiting, nothing to save"),
    (signal.SIGHUP, "while exiting: exiting at once", "SIGHUP while exiting: exiting at once")])
def test_outside_training_a_signal_exits_at_once_after_on_exit(signum, finished, line):
    """Before training (loading, compiling) and once training is over (closing the logs, the process's clean-up:
    library threads joined, temporary files removed) a signal is one line and the shell's code, no traceback."""
    proc = run(f"""
        request = StopRequest()
        request.training = True
        if {finished!r}:
            request.finished({finished!r})
        else:
            request.training = False
        request.on_exit.append(lambda: print("lock released", flush=True))
        os.kill(os.getpid(), {int(signum)})
        time.sleep(10)  # e.g. compiling, or joining a thread: the watcher thread ends the process meanwhile
        print("not reached")
    """)
    assert proc.returncode == 128 + signum and proc.stdout.strip() == "lock released"
    assert proc.stderr.strip() == line


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


def test_every_evaluation_loop_stops_at_its_next_batch(capsys):
    """faults.check() is the one stop point of every evaluation: validation bpb, sampling and CORE's scorer raise
    Stopped before their next batch once a signal arrived during training; outside training it does nothing."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxchat.eval.core_eval import RowScorer
    from jaxchat.eval.loss_eval import evaluate_bpb, greedy_generate, make_bpb_step
    from jaxchat.model.gpt import GPT, GPTConfig

    config = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nnx.to_pure_dict(abstract))  # no init ops to run
    drawn = []

    def batches():
        while True:
            drawn.append(1)
            yield np.ones((1, 8), np.int32), np.ones((1, 8), np.int32)

    faults.check()  # no run in progress: nothing to do
    request = StopRequest()
    try:
        request.training = True
        faults.check()  # not signalled: nothing to do
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Stopped):
            evaluate_bpb(make_bpb_step(graphdef), params, batches(), 2, jnp.ones(64, jnp.int32))
        assert not drawn  # stopped before drawing a batch
        with pytest.raises(Stopped):
            greedy_generate(graphdef, params, [[1, 2]], 4, set())
        with pytest.raises(Stopped):
            RowScorer(nnx.merge(graphdef, params), 0).score([[1, 2, 3]], [1], [3])
    finally:
        request.restore_handlers()
    faults.check()  # handlers restored: no longer a run in progress
    assert "Received SIGTERM" in capsys.readouterr().out


def test_sighup_from_a_terminal_that_hung_up_still_saves(tmp_path):
    """SIGHUP after the terminal closed: the line cannot be written (EIO), so output goes to /dev/null instead of
    failing the run's next print before it has saved."""
    import pty
    master, slave = pty.openpty()
    script = textwrap.dedent("""
        import os, signal
        from jaxchat.runtime.faults import StopRequest
        request = StopRequest()
        request.training = True
        input()  # the test closes the terminal, then sends SIGHUP
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(3):
            print("a step line", flush=True)  # EIO on the hung-up terminal, unless redirected
        with open(os.environ["MARK"], "w") as f:
            f.write(str(request.signum))
        raise SystemExit(request.exit_code)
    """)
    mark = tmp_path / "signum"
    with hangup_default():
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=slave, stderr=slave,
                                env=dict(os.environ, MARK=str(mark)), start_new_session=True)
    os.close(slave)
    os.close(master)  # the terminal hangs up
    proc.communicate(b"\n", timeout=60)
    assert proc.returncode == 129
    assert mark.read_text() == str(int(signal.SIGHUP))


def test_ctrl_c_outside_training_is_one_line():
    """cli.run, every command's entry point: a KeyboardInterrupt (base_eval, export, downloads) is one line and 130,
    at once: work still running in other threads (XLA compiling) is not waited for, nor torn down under (that was a
    segmentation fault: tests/test_core_eval.py::test_ctrl_c_during_core_is_one_line_and_130_never_a_crash)."""
    script = textwrap.dedent("""
        import threading, time
        from jaxchat.runtime import cli

        def interrupted():
            threading.Thread(target=time.sleep, args=(60,)).start()  # still busy, like XLA's compile threads
            raise KeyboardInterrupt

        cli.run(interrupted)
    """)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 130 and proc.stderr == "interrupted by SIGINT: exiting\n", proc.stderr
    assert time.monotonic() - t0 < 30


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
