"""Surviving interruptions: SIGTERM/SIGINT/SIGHUP become a save-and-exit at a step boundary or between the batches of
an evaluation (`check`), agreed by every process."""

import os
import signal
import threading
import time

import jax
import numpy as np

from jaxchat.runtime.common import print0


def any_process(flag: bool) -> bool:
    """True on every process if it is true on any (so all processes take the same branch)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


# SIGHUP (the terminal closed, or a scheduler's hang-up) is treated as SIGTERM: by default it kills the run unsaved.
# Under `nohup` it is ignored, and stays so: the run was started to outlive its terminal.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):
    """Raised by `check()` once a signal has arrived: unwinds an evaluation to the loop, which saves and exits. A
    BaseException, so that the handlers of failed evaluations (`except Exception`) let it through."""


_active: "StopRequest | None" = None  # the request of the run in progress, which `check()` reads


def check() -> None:
    """Between the batches of an evaluation (validation, CORE, samples): raise Stopped if a signal arrived during
    training, so an evaluation never delays a stop by more than one batch. Collective like `requested()` (every
    process calls it at the same points); a no-op outside a training run (base_eval, tests)."""
    if _active is not None and _active.training and _active.requested():
        raise Stopped


class StopRequest:
    """Catches SIGTERM (preemption), SIGINT (Ctrl-C) and SIGHUP: the loop finishes its step (or the evaluation its
    batch), saves, and exits.

    Outside training (loading, compiling: nothing to save yet; or after the final checkpoint is committed) a signal
    exits at once with one line (`idle_line`) and the shell's code (128 + the signal: 130 / 143 / 129), even while the
    main thread is inside XLA: signal.set_wakeup_fd makes the C-level handler write the signal to a pipe that a watcher
    thread reads, since Python handlers only run between bytecodes. A second SIGINT exits the same way, for a user who
    does not want to wait for the save. `on_exit` callbacks (releasing the checkpoint lock) run first.
    """

    def __init__(self, idle_line: str = "before training started: exiting, nothing to save", every_process=False):
        """idle_line: what a signal outside training says; every_process: every process says it, not process 0 alone
        (while the processes join, asking JAX which process this is would start a backend, which waits for the
        join, or fails with it)."""
        global _active
        self.signum: int | None = None
        self.training = False
        self.idle_line = idle_line
        self.every_process = every_process
        self.on_exit: list = []
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS
                          if not (s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN)}
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write = write
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="stop-request").start()
        _active = self

    def _handle(self, signum, frame) -> None:
        if self.training and self.signum is None:
            self.signum = signum
            say(f"Received {signal.Signals(signum).name}: finishing this step (or evaluation batch), then saving a "
                f"checkpoint")

    def _watch(self) -> None:
        interrupts = 0
        while data := os.read(self._read, 1):
            signum = data[0]
            if signum not in SIGNALS:  # another handler's signal (wakeup fds are global)
                continue
            interrupts += signum == signal.SIGINT
            if not self.training:
                self._exit(signum, f"{signal.Signals(signum).name} {self.idle_line}")
            elif interrupts >= 2:
                self._exit(signum, "second SIGINT: exiting without waiting for the save; resume with "
                                   "--resume-from-step=last (the last complete checkpoint)")
        os.close(self._read)

    def _exit(self, signum: int, line: str) -> None:
        for callback in self.on_exit:
            try:
                callback()
            except Exception:
                pass
        if self.every_process or jax.process_index() == 0:
            try:
                os.write(2, f"{line}\n".encode())
            except OSError:  # the terminal hung up (SIGHUP): nobody to tell
                pass
        os._exit(128 + signum)

    def requested(self) -> bool:
        """Whether any process was signalled (collective: call it on every process at the same step)."""
        return any_process(self.signum is not None)

    def finished(self, line: str) -> None:
        """Training is over and everything is saved: from now on a signal exits at once, saying `line`."""
        self.idle_line = line
        self.training = False

    def restore_handlers(self) -> None:
        global _active
        if _active is self:
            _active = None
        if self._write is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        os.close(self._write)  # ends the watcher
        self._write = None

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by that signal (143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP)."""
        return 128 + (self.signum or signal.SIGTERM)


def say(line: str) -> None:
    """print0 that survives a terminal gone (SIGHUP): then stdout and stderr go to /dev/null, so the run's later lines
    do not fail it before it has saved."""
    try:
        print0(line)
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)


class SaveTimer:
    """Time-based saves (`--save-every-minutes`), decided on process 0's clock so every process agrees."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def due(self) -> bool:
        if self.seconds <= 0:
            return False
        return any_process(jax.process_index() == 0 and time.monotonic() - self.last >= self.seconds)

    def reset(self) -> None:
        self.last = time.monotonic()
