"""Small shared helpers: the base directory, user-facing errors, input and output files, rank-0 printing, command-line
help."""

import argparse
import contextlib
import errno
import math
import os
import tempfile
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
    fails or is interrupted (a signal is an exception under cli.run), so readers see the whole file or the old one
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
    is one line and exit code 2 (a UserError through cli.run), not argparse's usage block."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"{message} (see --help)"))
    return parser


def finite_float(text) -> float:
    """The one parser of every float flag (jaxchat.train's, config files', jaxchat.training.plan's, tok_train's): a
    number, never NaN or an infinity. NaN fails every comparison, so it would pass every range check and surface later
    (a NaN loss blamed on the learning rate, a horizon ignored); an infinity makes int() raise OverflowError.

    Raises argparse.ArgumentTypeError, which argparse turns into 'argument --flag: ...' (one line via cli_parser)
    and config.py into a line naming the flag."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (NaN and infinities are refused)")
    return value


def fmt_bytes(n: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
