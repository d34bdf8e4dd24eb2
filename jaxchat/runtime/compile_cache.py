"""JAX's persistent compilation cache, on by default: a restarted run loads its compiled programs instead of compiling.

`enable(flag)` points JAX at a directory (`--compile-cache`; default `$JAX_COMPILATION_CACHE_DIR`, else
`$JAXCHAT_BASE_DIR/jax_cache`) with thresholds at zero, so every program is cached: the train step, validation,
CORE's buckets and sampling. Entries are keyed by the program, the devices, the compile options and the jax/jaxlib
versions, so another version or device simply misses.

Several processes: JAX writes entries from process 0 only (jax._src.compiler._cache_write) and every process reads,
so on a shared file system the other hosts load what process 0 compiled. JAX's own file cache writes an entry in
place (`Path.write_bytes`) and never rewrites one that exists: a reader can see half an entry, and a process killed
mid-write (preemption) or a full disk leaves a truncated entry that fails every later run. Here entries are written
to a temporary file and renamed, which is atomic on one file system, so an entry is whole or absent; a bad entry is
replaced by the next compile of its program.

A cache problem never stops a run: a directory that cannot be written is one line and no cache; an entry that cannot
be read or written (corrupt, disk full) is one line for the whole run, and the program is compiled.
"""

import contextlib
import os
import re
import sys
import tempfile
import uuid
import warnings

import jax

from jaxchat.runtime.common import UserError, base_dir, check_writable, user_path

OFF = ("", "off", "none")  # --compile-cache values that turn the cache off
AUTO = "auto"  # the default place: $JAX_COMPILATION_CACHE_DIR, else $JAXCHAT_BASE_DIR/jax_cache
SUFFIX = "-cache"  # jax's LRUCache names an entry KEY-cache: a directory shared with plain jax programs shares entries
# jax's cache warnings (jax._src.compiler, jax._src.lru_cache): reading or writing an entry failed, an entry too big
CACHE_WARNINGS = ("Error reading persistent compilation cache", "Error writing persistent compilation cache",
                  "exceeds the maximum cache size")

_warned = False  # one line per process for all cache problems


def resolve(flag: str | None) -> str | None:
    """The cache directory `--compile-cache` names: None when off; None or 'auto' is the default place."""
    value = (flag if flag is not None else AUTO).strip()
    if value.lower() in OFF:
        return None
    if value.lower() != AUTO:
        return user_path(value)
    return user_path(os.environ.get("JAX_COMPILATION_CACHE_DIR")) or default_dir()


def default_dir() -> str:
    """$JAXCHAT_BASE_DIR/jax_cache."""
    return os.path.join(base_dir(), "jax_cache")


def enable(cache_dir: str | None = None) -> str | None:
    """Turn JAX's persistent compilation cache on in `cache_dir` ('', 'off' or 'none': off); the directory, or None."""
    try:
        path = resolve(cache_dir)
        if path is not None and path == default_dir():
            check_writable(base_dir(), "base directory")
    except UserError:  # an unusable base directory: the command reports it itself, in one line
        path = None
    if path is not None and "://" not in path:  # object stores (gs://) have no directories to check
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test."):
                pass
        except OSError as e:
            _warn(f"cannot write to {path} ({e.strerror or type(e).__name__}); compiling without it (set "
                  f"--compile-cache=DIR, or off)")
            path = None
    jax.config.update("jax_enable_compilation_cache", path is not None)
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", path)
        # Every program, however quick to compile or small: the defaults (1 s, and a size floor a file system may
        # raise) skip validation, sampling and CORE's programs at small sizes. -1: no floor, and none imposed later.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        # cuDNN attention is partitioned by jax's custom_partitioning, which writes its Python callback's address into
        # the program: every process would get a new key and a GPU step would never hit (seen: jaxchat.aot compiling
        # for H100s missed on every run). The partitioning is done before the executable is stored, and the callback
        # is jax's own (its version is in the key), so the address is left out of the key.
        jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)
        _atomic_writes()
        _one_line_warnings()
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # jax opens its cache once, at the first compile: from now on, this one
    return path


def _warn(message: str) -> None:
    """Print the first cache problem of this process as one line on stderr; later ones are not shown."""
    global _warned
    if not _warned:
        _warned = True
        print(f"warning: JAX compilation cache: {message}", file=sys.stderr, flush=True)


def _one_line_warnings() -> None:
    """Show jax's cache warnings as one `_warn` line (warnings print two lines each, one per program); others as
    before."""
    if getattr(warnings.showwarning, "jaxchat_compile_cache", False):
        return
    for pattern in CACHE_WARNINGS:  # shown, never raised: also under -W error (a cache problem must not stop a run)
        warnings.filterwarnings("default", message=".*" + re.escape(pattern))
    previous = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if not any(pattern in text for pattern in CACHE_WARNINGS):
            return previous(message, category, filename, lineno, file, line)
        _warn(f"{(text.strip().splitlines() or [''])[0][:300]}; compiling instead (further cache problems of "
              f"this run are not shown)")

    showwarning.jaxchat_compile_cache = True
    warnings.showwarning = showwarning


class AtomicFileCache:
    """jax's file cache interface (get, put, _path) on a local directory, each entry written whole by a rename."""

    def __init__(self, path: str):
        self._path = self.path = path
        os.makedirs(path, exist_ok=True)

    def get(self, key: str) -> bytes | None:
        """The entry's bytes, or None if there is none."""
        try:
            with open(os.path.join(self.path, key + SUFFIX), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, key: str, value: bytes) -> None:
        """Write the entry beside its name, then rename it over: readers see all of it or nothing.

        jax calls put only after a miss or an entry it could not load, so replacing an existing entry is what
        repairs a bad one (two processes that both missed write the same program: either copy is right)."""
        # a name no other process or host picks; mode 0o666 less the umask, like jax's own entries (mkstemp's 0o600
        # would hide them from the other users of a shared cache)
        tmp = os.path.join(self.path, f".{key}.{uuid.uuid4().hex}.tmp")
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
                f.write(value)
            os.replace(tmp, os.path.join(self.path, key + SUFFIX))
        except BaseException:
            with contextlib.suppress(OSError):  # a failing disk may have lost it already
                os.unlink(tmp)
            raise  # jax turns it into its warning: one `_warn` line


def _atomic_writes() -> None:
    """Have jax open `AtomicFileCache` for a local directory without a size limit (its LRU eviction, with
    `jax_compilation_cache_max_size`, locks every read and write instead; remote stores write whole objects)."""
    from jax._src import compilation_cache as jax_cache  # private: a jax without this hook keeps its own cache

    original = getattr(jax_cache, "get_file_cache", None)
    if original is None or getattr(original, "jaxchat_compile_cache", False):
        return

    def get_file_cache(path: str):
        if ("://" in path or jax.config.jax_compilation_cache_max_size != -1
                or jax.config.jax_compilation_cache_check_contents):
            return original(path)
        return AtomicFileCache(path), path

    get_file_cache.jaxchat_compile_cache = True
    jax_cache.get_file_cache = get_file_cache
