"""Surviving interruptions: SIGTERM/SIGINT become a save-and-exit at a step boundary, agreed by every process."""

import signal
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

    A second SIGINT exits at once, for a user who does not want to wait for the save.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print0(f"Received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    def requested(self) -> bool:
        """Whether any process was signalled (collective: call it on every process at the same step)."""
        return any_process(self.signum is not None)

    def restore_handlers(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

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
