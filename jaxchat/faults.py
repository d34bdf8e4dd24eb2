"""Surviving interruptions: SIGTERM/SIGINT become a save-and-exit at a step boundary, agreed by every process."""

import os
import signal
import threading
import time

import jax
import numpy as np

from jaxchat.common import print0


def any_process(flag: bool) -> bool:
    """True on every process if it is true on any (so all processes take the same branch)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


class StopRequest:
    """Catches SIGTERM (preemption) and SIGINT (Ctrl-C): the loop finishes its step, saves, and exits.

    Before the loop starts (loading, compiling: nothing to save yet) a signal exits at once with one line and the
    shell's code (130 / 143), even while the main thread is inside XLA: signal.set_wakeup_fd makes the C-level handler
    write the signal to a pipe that a watcher thread reads, since Python handlers only run between bytecodes. A second
    SIGINT exits the same way, for a user who does not want to wait for the save. `on_exit` callbacks (releasing the
    checkpoint lock) run first.
    """

    def __init__(self):
        self.signum: int | None = None
        self.training = False
        self.on_exit: list = []
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write = write
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="stop-request").start()

    def _handle(self, signum, frame) -> None:
        if self.training and self.signum is None:
            self.signum = signum
            print0(f"Received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    def _watch(self) -> None:
        interrupts = 0
        while data := os.read(self._read, 1):
            signum = data[0]
            if signum not in (signal.SIGINT, signal.SIGTERM):  # another handler's signal (wakeup fds are global)
                continue
            interrupts += signum == signal.SIGINT
            if not self.training:
                self._exit(signum, f"{signal.Signals(signum).name} before training started: exiting, nothing to save")
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
        if jax.process_index() == 0:
            os.write(2, f"{line}\n".encode())
        os._exit(128 + signum)

    def requested(self) -> bool:
        """Whether any process was signalled (collective: call it on every process at the same step)."""
        return any_process(self.signum is not None)

    def restore_handlers(self) -> None:
        if self._write is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        os.close(self._write)  # ends the watcher
        self._write = None

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by that signal (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + (self.signum or signal.SIGTERM)


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
