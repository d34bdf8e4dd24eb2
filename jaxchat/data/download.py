"""Downloads and directory builds that never leave half a file or half a directory under the final name.

Used by the pretraining shards (dataset.py) and the CORE eval bundle (core_bundle.py). nanochat does both with
nanochat/common.py download_file_with_lock and nanochat/dataset.py download_single_file (temp file, then rename).
"""

import os
import shutil
import threading
import urllib.request
import uuid
from collections.abc import Callable

from jaxchat.runtime.common import replacing


class Stopped(Exception):
    """A fetch ended by its `stop` event (the command is exiting), never retried."""


def fetch(url: str, path: str, *, timeout: float = 60.0, check: Callable[[str], None] | None = None,
          progress: str | None = None, stop: threading.Event | None = None) -> str:
    """Stream url into path via a temporary file beside it, renamed into place once complete (and `check`ed).

    The temporary name carries the process id, so two processes fetching the same file never write the same temporary
    file; the last rename wins and both leave a complete file. Any error (OSError for network failures, whatever
    `check` raises) removes the temporary file and propagates. `progress` names a tqdm progress bar. `stop` set (the
    command was interrupted: fetches run in worker threads, which no signal reaches) ends it at its next chunk with
    Stopped, its temporary file removed.
    """
    with replacing(path, unique=True) as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = _progress_bar(progress, total)
            while chunk := response.read(1 << 20):
                if stop is not None and stop.is_set():
                    raise Stopped(url)
                f.write(chunk)
                bar.update(len(chunk))
            bar.close()
        if check is not None:
            check(tmp)
    return path


class _NoBar:
    """The bar of a fetch that shows none."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(desc: str | None, total: int | None):
    """A tqdm bar on process 0 when `desc` is given, else one that shows nothing. Not a disabled tqdm: building one
    takes tqdm's global lock, which a signal can leave held by the main thread (raised in its handler while tqdm's
    own bar is being built there), and every worker thread's fetch then waited on it for ever."""
    import jax
    from tqdm import tqdm

    if desc is None or jax.process_index() != 0:
        return _NoBar()
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc)


def build_directory(dest: str, build: Callable[[str], str | None], complete: Callable[[str], bool],
                    owned: Callable[[str], bool] = lambda name: False) -> str:
    """Fill a temporary directory beside dest with build(tmp) and rename it to dest; returns dest.

    `build` returns the directory to install (tmp itself when it returns None, or one inside it, e.g. the top folder
    of an extracted archive). Readers of dest never see a half-built directory. A dest that is already `complete`
    (another process renamed its build first) is kept and this build dropped; an incomplete one is replaced, keeping
    what a build did not write: its entries move into the new build unless the build has one of that name or
    `owned(name)` (names only a build writes, e.g. shards an older build left) says they are the builder's.
    """
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    # A unique name (processes on several hosts may share the filesystem); os.mkdir keeps the umask's permissions,
    # which the installed directory then has (tempfile.mkdtemp would make it private to this user).
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.{uuid.uuid4().hex}.tmp")
    os.mkdir(tmp)
    try:
        root = build(tmp) or tmp
        if not complete(dest):
            _keep_foreign_entries(dest, root, owned)  # a broken earlier build (never a complete one: others read it)
            shutil.rmtree(dest, ignore_errors=True)
            try:
                os.replace(root, dest)
            except OSError:  # another process renamed its build first
                if not complete(dest):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _keep_foreign_entries(dest: str, root: str, owned: Callable[[str], bool]) -> None:
    """Move dest's entries that the new build (root) does not replace and the builder does not own into root."""
    if not os.path.isdir(dest):
        return
    for name in os.listdir(dest):
        if not owned(name) and not os.path.exists(os.path.join(root, name)):
            os.replace(os.path.join(dest, name), os.path.join(root, name))
