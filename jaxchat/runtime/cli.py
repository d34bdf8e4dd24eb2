"""Every command's process: set up once, the same way (`run`), and ended in one line for a mistake or a signal.

Each `python -m jaxchat.X` ends in `cli.run(main, argv, setup=cli.Setup(...))`: its `Setup` says what the command
needs beyond what every command gets. Every command gets, before anything starts a backend: the platforms JAX may
start (backend.choose_platforms), jaxchat's XLA flags and GPU memory fraction (xla_flags: the same compiler options
for training and evaluation, so a program compiled by one is the program the other runs and the cache's entry), and
signals that unwind the work's clean-up (`_interrupt`). A command asks for the rest: the malloc setting, the
persistent compilation cache (its --compile-cache flag) and the multi-process start (its coordinator flags, or the
environment). Nothing is set up at import: importing a command module changes no process state (tests/test_imports.py).
"""

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import traceback

from jaxchat.runtime import backend, compile_cache, host_memory, watchdog, xla_flags
from jaxchat.runtime.common import UserError
from jaxchat.runtime.distributed import init_distributed
from jaxchat.runtime.faults import StopRequest


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a command's process needs beyond every command's set-up; read by `run` before the command's work."""

    # compiles for devices that are not here (jaxchat.aot): no accelerator starts unless JAX_PLATFORMS names one
    compile_only: bool = False
    keep_freed_memory: bool = False  # host_memory: XLA:CPU's per-step buffers reused (a training process)
    # the parsed flags' compile_cache: JAX's persistent compilation cache (compile_cache.enable)
    compile_cache: bool = False
    # join the other processes (distributed.init_distributed): with the parsed flags' coordinator_address,
    # num_processes, process_id, init_timeout and peer_timeout where the command has them, else the environment's
    distributed: bool = False


DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id", "init_timeout", "peer_timeout")


def run(main, *args, setup: Setup = Setup(), parse=None) -> None:
    """Set the process up and run `main(*args)` (with `parse`: `main(parse(*args))`, the flag-dependent set-up
    between); a UserError becomes one line on stderr and exit code 2 (no traceback), a Ctrl-C, SIGTERM or SIGHUP one
    line and code 130, 143 or 129, after the interrupted work's clean-up.

    In a multi-process run a failing process also tells the others, which exit at once rather than wait in a
    collective for it; its line starts with 'process P of N:'.
    """
    previous, hook = {}, sys.unraisablehook
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):  # an ignored SIGHUP (nohup) stays ignored; Ctrl-C keeps Python's
            if signal.getsignal(s) is signal.SIG_DFL:  # KeyboardInterrupt, so a second one still cuts a clean-up short
                previous[s] = signal.signal(s, _interrupt)
                _INSTALLED.add(s)
        sys.unraisablehook = _unraisable(hook)
    try:
        _run(lambda: _start(main, args, setup, parse))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
            _INSTALLED.discard(s)
        sys.unraisablehook = hook


def _start(main, args, setup: Setup, parse) -> None:
    """The set-up in its order (each before what it must precede), then the command."""
    backend.choose_platforms(compile_only=setup.compile_only)  # JAX_PLATFORMS checked, a quiet CPU start
    xla_flags.apply()  # XLA reads $XLA_FLAGS once, when the first backend starts
    if setup.keep_freed_memory:
        host_memory.keep_freed_memory()  # before threads allocate
    if parse is None:
        return main(*args)
    flags = parse(*args)
    # train's --dry-run prints the plan and nothing else: no cache directory written, no peers joined
    if not getattr(flags, "dry_run", False):
        if setup.compile_cache:
            compile_cache.enable(flags.compile_cache)  # touches no backend: before the start below
        if setup.distributed:
            start_distributed(flags)
    return main(flags)


def start_distributed(flags) -> None:
    """Join the other processes with the command's coordinator flags (unset: '', 0 or -1) or the environment; a signal
    while waiting for them exits at once, in one line (a Python handler would wait for the C++ join to return)."""
    given = {name: getattr(flags, name) for name in DISTRIBUTED_FLAGS if hasattr(flags, name)}
    for name in ("coordinator_address", "num_processes"):
        given[name] = given.get(name) or None
    if given.get("process_id") is not None and given["process_id"] < 0:
        given["process_id"] = None
    guard = StopRequest("while joining the other processes: exiting", every_process=True)
    try:
        init_distributed(**given)
    finally:
        guard.restore_handlers()


# ----------------------------------------------------------------------------------------------------------------
# Ending in one line


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP where no handler of ours runs (tok_train, base_eval, export, downloads; training has
    faults.StopRequest), raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that the interrupted
    work's `finally` clean-up (temporary files) runs before `run`'s one line. Their default action killed the
    process on the spot: no line, and `.tmp` files left behind."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_INSTALLED: set[int] = set()  # the signals `run` handles with _interrupt (SIGTERM, SIGHUP)


def _interrupt(signum, frame):
    """Raise Interrupted, once: the signals are ignored from here on, so that a second one cannot cut the first one's
    clean-up short (a download's worker threads removing their .tmp files) and leave files behind."""
    for s in _INSTALLED:
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def _unraisable(previous):
    """sys.unraisablehook that sends a KeyboardInterrupt or Interrupted swallowed where Python cannot raise (a
    garbage-collector callback, a __del__: "Exception ignored in _xla_gc_callback") again, so it lands in the main
    code. From another thread a moment later: sent from here, the handler would run at once, inside the same
    callback, and be swallowed again."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):  # Ctrl-C's, or Interrupted
            signum = getattr(unraisable.exc_value, "signum", signal.SIGINT)
            if signum in _INSTALLED:  # _interrupt ignored it from then on: heard again, it must raise
                signal.signal(signum, _interrupt)
            threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
        else:
            previous(unraisable)
    return hook


def _run(work) -> None:
    """`work()`, its errors and interruptions each ended as `run` says."""
    try:
        work()
    except UserError as e:
        if watchdog.active():
            watchdog.abort(f"error: {watchdog.prefix()}{e}", 2)
        _exit_2(f"error: {e}")
    except KeyboardInterrupt as e:
        _interrupted(getattr(e, "signum", signal.SIGINT))
    except Exception as e:
        if (line := backend.startup_error(e)) is not None:  # JAX_PLATFORMS naming a backend that cannot start
            _exit_2(f"error: {line}")
        if watchdog.active():
            if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError"):  # e.g. gloo: "Connection reset by peer"
                watchdog.await_verdict()  # a dead peer is named by the watchdog's line, not this exception
            traceback.print_exc()
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            watchdog.abort(f"error: {watchdog.prefix()}{type(e).__name__}: {first}", 1)
        raise


def _exit_2(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    # Library threads (orbax, tensorstore) interrupted by the early exit print tracebacks during interpreter
    # shutdown that would bury the one line that matters: nothing after it goes to stderr.
    sys.stderr = open(os.devnull, "w")
    sys.exit(2)


def _interrupted(signum: int) -> None:
    """Ctrl-C (or SIGTERM, SIGHUP: Interrupted) where no handler of ours runs (evaluation, export, downloads;
    training has faults.StopRequest): one line and the shell's code, not a traceback from whatever it interrupted."""
    for s in _SIGNALS:  # a second signal now adds nothing
        signal.signal(s, signal.SIG_IGN)
    line = f"{watchdog.prefix()}interrupted by {signal.Signals(signum).name}: exiting"
    if watchdog.active():
        watchdog.abort(line, 128 + signum)
    with contextlib.suppress(Exception):  # OSError: the terminal hung up (SIGHUP)
        print(line, file=sys.stderr, flush=True)
    # Out at once: the interrupted work's own `finally` clean-up has run while the exception unwound, but XLA's
    # threads may still be compiling or running what it started, and tearing the interpreter down under them
    # crashed (SIGSEGV, rc 139, Ctrl-C during base_eval's CORE). faults.StopRequest exits the same way.
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(128 + signum)
