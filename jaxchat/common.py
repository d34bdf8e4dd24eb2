"""Small shared helpers: the base directory, user-facing errors, input and output files, rank-0 printing, command-line
help."""

import argparse
import contextlib
import errno
import math
import os
import signal
import sys
import tempfile
import threading
import uuid

import jax


class UserError(Exception):
    """A mistake the user can fix; entry points print it as one line and exit with code 2."""


def user_path(text: str | None) -> str | None:
    """The one place a path from the environment or a flag is expanded: `~` and `~user`, then a relative path made
    absolute, once, when the command reads it. A shell leaves `~` alone inside quotes and after `--flag=`, so
    `JAXCHAT_BASE_DIR="~/jc"` used to write into a folder named `~` here, which pyarrow (it expands `~` itself) then
    never found. '' and None stay as they are (they mean a default), and so do URLs (gs://...)."""
    if not text or "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def check_name(name: str, flag: str) -> str:
    """A name that becomes one folder of a path (a model tag): refused in one line if it would name another folder
    (`..`, `.`, a `/`, '') or cannot be a file name, so nothing is written, read or rolled back outside the folder
    it belongs in. (WandB's --run name is no path: wandb names its folders by time and id.)"""
    if name in ("", ".", "..") or "/" in name or (os.altsep and os.altsep in name) or "\0" in name:
        raise UserError(f"{flag}={name!r} must be a plain folder name (not empty, '.' or '..', no '/'): it names a "
                        f"folder inside its parent, e.g. {flag}=d12")
    return name


def base_dir() -> str:
    """Root for data, tokenizer, checkpoints and eval bundles ($JAXCHAT_BASE_DIR, default ~/.cache/jaxchat)."""
    path = user_path(os.environ.get("JAXCHAT_BASE_DIR")) or os.path.join(os.path.expanduser("~"), ".cache", "jaxchat")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a regular file of that name, read-only storage, no permission
        raise UserError(f"cannot use {path} as the base directory ({e.strerror or type(e).__name__}): set "
                        f"JAXCHAT_BASE_DIR to a writable directory") from None
    return path


def check_writable(path: str, what: str) -> None:
    """Create `path` if needed and write a file in it: a run finds out before compiling, not at its first save."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test."):
            pass
    except OSError as e:
        raise UserError(f"cannot write to the {what} {path} ({e.strerror or type(e).__name__}): check its "
                        f"permissions and free space, or set JAXCHAT_BASE_DIR to a writable directory") from None


def check_output(path: str, what: str, directory: bool = False) -> str:
    """The absolute path of an output a command writes (a file, or with `directory` a folder), checked before the
    work that produces it, creating nothing: no file where a folder goes or folder where the file goes, and the
    nearest existing folder on its way writable. Every output path a command is given comes through here."""
    path = os.path.abspath(path)
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file, not a directory: choose another {what}")
    if not directory and os.path.isdir(path):
        raise UserError(f"{what} {path} is a directory: give a file name")
    existing = path if directory else os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot write {what} {path}: {existing} is a file, not a directory; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {existing} is not writable (permissions or read-only storage); "
                        f"choose another {what}")
    return path


def read_input(path: str, read, what: str, fix: str):
    """`read(path)` of an input file; a missing, unreadable, corrupt or truncated file is one line naming it and `fix`.

    Every file jaxchat reads that orbax and parquet do not (tokenizer pickles, .pt, .npz and meta json files) comes
    through here, so a damaged file is one line, never a traceback from inside torch, pickle or numpy. `read` raises
    ValueError for contents that parse but are not what it expects.
    """
    if not os.path.exists(path):
        raise UserError(f"no {what} at {path}: {fix}")
    try:
        return read(path)
    except (UserError, MemoryError):
        raise
    except Exception as e:  # unpickling, unzipping and parsing garbage raise many different types
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EISDIR):
            raise UserError(f"cannot read the {what} {path} ({e.strerror}): check the path and its "
                            f"permissions") from None
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"the {what} {path} is corrupt or truncated ({os.path.getsize(path):,} bytes; "
                        f"{type(e).__name__}: {first}): {fix}") from None


@contextlib.contextmanager
def replacing(path: str, unique: bool = False):
    """A temporary name beside `path` to write, renamed over `path` once the block ends without error; removed if it
    fails or is interrupted (a signal is an exception under run_main), so readers see the whole file or the old one
    and no half-written file is left. `unique`: a name of this process's own (pid and a random part), for files
    several processes or hosts may write at once; otherwise `path`.tmp, which a later command can recognise."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp" if unique else f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def print0(*args, **kwargs) -> None:
    """Print on process 0 only."""
    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


JAXCHAT_ONLY = "[jaxchat] "  # prefixes the help of flags that nanochat's command does not have


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help output: the description as written (module docstrings), each option's default after its help.

    A help text that explains its default itself ("(default: the last)") is left as written.
    """

    def _get_help_string(self, action):
        return action.help if "(default: " in (action.help or "") else super()._get_help_string(action)


def cli_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser whose --help shows the description verbatim and every option's default; a bad argument
    is one line and exit code 2 (a UserError through run_main), not argparse's usage block."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"{message} (see --help)"))
    return parser


def finite_float(text) -> float:
    """The one parser of every float flag (jaxchat.train's, config files', jaxchat.plan's, tok_train's): a number,
    never NaN or an infinity. NaN fails every comparison, so it would pass every range check and surface later (a
    NaN loss blamed on the learning rate, a horizon ignored); an infinity makes int() raise OverflowError.

    Raises argparse.ArgumentTypeError, which argparse turns into 'argument --flag: ...' (one line via cli_parser)
    and config.py into a line naming the flag."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (NaN and infinities are refused)")
    return value


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP where no handler of ours runs (tok_train, base_eval, export, downloads; training has
    faults.StopRequest), raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that the interrupted
    work's `finally` clean-up (temporary files) runs before run_main's one line. Their default action killed the
    process on the spot: no line, and `.tmp` files left behind."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_INSTALLED: set[int] = set()  # the signals run_main handles with _interrupt (SIGTERM, SIGHUP)


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


def run_main(main, *args) -> None:
    """Run an entry point; a UserError becomes one line on stderr and exit code 2 (no traceback), a Ctrl-C, SIGTERM
    or SIGHUP one line and code 130, 143 or 129, after the interrupted work's clean-up.

    In a multi-process run a failing process also tells the others, which exit at once rather than wait in a
    collective for it; its line starts with 'process P of N:'.
    """
    from jaxchat import backend, watchdog

    previous, hook = {}, sys.unraisablehook
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):  # an ignored SIGHUP (nohup) stays ignored; Ctrl-C keeps Python's
            if signal.getsignal(s) is signal.SIG_DFL:  # KeyboardInterrupt, so a second one still cuts a clean-up short
                previous[s] = signal.signal(s, _interrupt)
                _INSTALLED.add(s)
        sys.unraisablehook = _unraisable(hook)
    try:
        _run_main(main, args, backend, watchdog)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
            _INSTALLED.discard(s)
        sys.unraisablehook = hook


def _run_main(main, args, backend, watchdog) -> None:
    try:
        backend.choose_platforms()  # before anything starts a backend: JAX_PLATFORMS checked, a quiet CPU start
        main(*args)
    except UserError as e:
        if watchdog.active():
            watchdog.abort(f"error: {watchdog.prefix()}{e}", 2)
        print(f"error: {e}", file=sys.stderr, flush=True)
        # Library threads (orbax, tensorstore) interrupted by the early exit print tracebacks during interpreter
        # shutdown that would bury the one line that matters: nothing after it goes to stderr.
        sys.stderr = open(os.devnull, "w")
        sys.exit(2)
    except KeyboardInterrupt as e:
        # Ctrl-C (or SIGTERM, SIGHUP: Interrupted) where no handler of ours runs (evaluation, export, downloads;
        # training has faults.StopRequest): one line and the shell's code, not a traceback from whatever it
        # interrupted.
        signum = getattr(e, "signum", signal.SIGINT)
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
    except Exception as e:
        if (line := backend.startup_error(e)) is not None:  # JAX_PLATFORMS naming a backend that cannot start
            print(f"error: {line}", file=sys.stderr, flush=True)
            sys.stderr = open(os.devnull, "w")
            sys.exit(2)
        if watchdog.active():
            import traceback

            if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError"):  # e.g. gloo: "Connection reset by peer"
                watchdog.await_verdict()  # a dead peer is named by the watchdog's line, not this exception
            traceback.print_exc()
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            watchdog.abort(f"error: {watchdog.prefix()}{type(e).__name__}: {first}", 1)
        raise


def fmt_bytes(n: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
