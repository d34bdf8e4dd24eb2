"""Orbax checkpoints: parameters, optimizer state and a JSON meta record, written atomically.

As nanochat/checkpoint_manager.py save_checkpoint / load_checkpoint (model, optimizer and meta files per step); loading
a model for evaluation is base_eval.open_checkpoint and base_eval.restore_model.

Layout: `$JAXCHAT_BASE_DIR/base_checkpoints/<model_tag>/<step>/{params,opt_state,meta}`. Orbax writes each step into
a temporary directory and renames it when complete, so a crash during a save leaves the previous step usable and the
half-written one is never listed. A training run holds `<dir>/.lock` (one writer per directory); "Saved checkpoint"
is printed once a save is committed; a resume from an older step moves the newer ones aside to `<dir>/rolled_back/`.
"""

import atexit
import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from jaxchat.runtime.common import UserError, base_dir, check_name, fmt_bytes, print0

ITEMS = ("params", "opt_state", "meta")
DISK_MARGIN = 1.1  # a save is expected to take at most this much more than the last checkpoint on disk
TEMPORARY_KINDS = ("time", "preempt")  # rotated by --keep-last; "step" (--save-every) and "final" ones stay


def checkpoint_dir(model_tag: str) -> str:
    """$JAXCHAT_BASE_DIR/base_checkpoints/<model_tag>: every reader and writer of a tag (train, base_eval, export)
    comes through here, so a tag that would leave base_checkpoints/ ('..', 'a/b') is refused for all of them."""
    return os.path.join(base_dir(), "base_checkpoints", check_name(model_tag, "--model-tag"))


class Checkpointer:
    """Saves and restores training state for one model tag (a writer locks the directory: lock=True)."""

    def __init__(self, directory: str, *, async_save: bool = True, lock: bool = False, keep_last: int | None = None,
                 step_flag: str = "--resume-from-step"):
        _hold_orbax_errors()
        self.directory = os.path.abspath(directory)
        self.step_flag = step_flag  # the reading command's flag that picks a step, for the advice in its errors
        self.keep_last = keep_last
        self.lock = DirectoryLock(self.directory) if lock else None
        self._pending: int | None = None  # step of the save in flight, printed once committed
        self._need = 0  # bytes of the state being saved
        self._reported: set[int] = set()
        if not lock and not os.path.isdir(self.directory):  # a reader creates nothing (no empty folder left)
            raise UserError(f"no checkpoint in {self.directory}: train first, or check --model-tag")
        try:
            options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=lock,
                                                   cleanup_tmp_directories=lock)
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        except OSError as e:
            self.release()
            raise UserError(f"cannot use {self.directory} for checkpoints ({e.strerror or e}): check the path "
                            f"and its permissions, or set JAXCHAT_BASE_DIR to a writable directory") from None

    # ---- listing ----------------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Complete checkpoints on disk, oldest first (a step folder without its items is skipped, with a line)."""
        self.manager.reload()
        complete = []
        for step in sorted(self.manager.all_steps()):
            missing = [i for i in ITEMS if not os.path.isdir(os.path.join(self.directory, str(step), i))]
            if not missing:
                complete.append(step)
            elif step not in self._reported:
                self._reported.add(step)
                print0(f"Skipping {self.directory}/{step}: not a complete checkpoint (no {', '.join(missing)})")
        return complete

    def last_complete(self) -> int | None:
        """The newest checkpoint once any save in flight is on disk (None if there is none)."""
        with contextlib.suppress(UserError):
            self.wait()
        steps = self.steps()
        return steps[-1] if steps else None

    def resolve_step(self, step: int | str) -> int:
        """A step number, or 'last' for the newest complete checkpoint."""
        steps = self.steps()
        if not steps:
            raise UserError(f"no checkpoint in {self.directory}: train first, or check --model-tag")
        if step == "last":
            return steps[-1]
        if int(step) not in steps:
            raise UserError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        return int(step)

    def move_aside_after(self, step: int) -> str | None:
        """Move every step folder newer than `step` (complete or not) to rolled_back/<time>/; the folder, or None.

        A resume from an older step (a rollback) would otherwise collide with them when it saves; they are kept,
        not deleted, so the rollback can be undone by moving them back.
        """
        self.manager.reload()
        newer = [s for s in self.manager.all_steps() if s > step]
        if not newer:
            return None
        aside = os.path.join(self.directory, "rolled_back", time.strftime("%Y%m%d-%H%M%S"))
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for s in sorted(newer):
                os.replace(os.path.join(self.directory, str(s)), os.path.join(aside, str(s)))
        _sync("checkpoints moved aside")
        self.manager.reload()
        return aside

    # ---- saving -----------------------------------------------------------------------------------------------

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Start saving step `step` (asynchronously); "Saved checkpoint" is printed once it is committed."""
        self.wait()  # the previous save first: its failure is reported as its own, and rotation sees it
        self.rotate()
        # The last checkpoint's size on disk, with a margin (the state compresses: 30 MiB in memory were 21 MB on
        # disk, so the in-memory size refused saves that fit on every resume of a nearly full disk); before the
        # first, the bytes in memory. An estimate too low is still one line: orbax's ENOSPC (_fail).
        on_disk = self._size_on_disk()
        self._need = (int(on_disk * DISK_MARGIN) if on_disk else
                      sum(x.nbytes for x in jax.tree.leaves((params, opt_state))))
        free = shutil.disk_usage(self.directory).free
        if free < self._need:  # refuse before writing: a full disk can fail other writers on it too
            raise UserError(self._no_room(step, self._need, free))
        self._pending = step
        try:
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            self._fail(step, e)

    def poll(self) -> None:
        """Print "Saved checkpoint" for a save that finished in the background (call it once per step)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is committed (UserError saying what went wrong if it failed)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._fail(self._pending, e)
        if self._pending is not None:
            print0(f"Saved checkpoint step {self._pending} to {self.directory}")
            self._pending = None

    def rotate(self) -> None:
        """Delete all but the newest `keep_last` timer/preemption checkpoints (committed ones only)."""
        if self.keep_last is None:
            return
        temporary = [s for s in self.steps() if self.read_meta(s).get("kind") in TEMPORARY_KINDS]
        for step in temporary[: max(0, len(temporary) - self.keep_last)]:
            self.manager.delete(step)

    def _fail(self, step: int | None, e: Exception):
        """Turn a failed save into one line naming the directory and what to do; the previous checkpoint stays."""
        self._pending = None
        if jax.process_index() == 0 and step is not None:  # the half-written step: never listed, but it takes space
            for name in os.listdir(self.directory):
                if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        text = " ".join(str(x) for x in _chain(e))
        codes = {getattr(x, "errno", None) for x in _chain(e)}
        last = [s for s in self.steps() if s != step]
        keep = f"the last complete checkpoint is step {last[-1]}" if last else "no checkpoint was completed"
        if errno.ENOSPC in codes or "RESOURCE_EXHAUSTED" in text or "No space left" in text:
            _HELD.clear()  # translated into one line: orbax's tracebacks of it are dropped
            raise UserError(self._no_room(step, self._need, shutil.disk_usage(self.directory).free)) from None
        if codes & {errno.EROFS, errno.EACCES, errno.EPERM} or "Read-only file system" in text or \
                "Permission denied" in text:
            _HELD.clear()
            raise UserError(f"cannot save checkpoint step {step}: {self.directory} is not writable (read-only or "
                            f"no permission); {keep}") from None
        _HELD.release()
        raise e

    def _no_room(self, step: int, need: int, free: int) -> str:
        last = [s for s in self.steps() if s != step]
        keep = (f"step {last[-1]} is the last complete checkpoint: free space or move {self.directory} to a larger "
                f"disk, then resume with --resume-from-step=last") if last else "free space, or set JAXCHAT_BASE_DIR " \
                                                                             "to a larger disk"
        return (f"no room to save checkpoint step {step} in {self.directory}: it needs about {fmt_bytes(need)}, "
                f"{fmt_bytes(free)} free; {keep}")

    def _size_on_disk(self) -> int:
        steps = self.steps()
        root = os.path.join(self.directory, str(steps[-1])) if steps else None
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files) if root else 0

    # ---- restoring --------------------------------------------------------------------------------------------

    def restore(self, step: int, abstract_params, abstract_opt_state=None) -> tuple:
        """(params, opt_state or None, meta) of a step, placed with the shardings of the abstract targets."""
        items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        try:
            with _quiet_on_failure():
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise UserError(f"checkpoint {self.directory}/{step} is corrupt or incomplete ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100]}...); {self._other_steps(step)}") from None
        return restored["params"], restored.get("opt_state") if abstract_opt_state is not None else None, restored["meta"]

    def read_meta(self, step: int) -> dict:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise UserError(f"checkpoint {self.directory}/{step} has no readable meta record ({type(e).__name__}); "
                            f"{self._other_steps(step)}") from None
        return restored["meta"]

    def _other_steps(self, step: int) -> str:
        """What to do about an unreadable step: pick another with this command's flag, or move it out of the way."""
        others = [s for s in self.steps() if s != step]
        move = f"move {self.directory}/{step} out of {self.directory} (keep it for inspection)"
        return (f"use another step with {self.step_flag}=N, N in {others[-5:]}, or {move}" if others else
                f"it is the only checkpoint there: restore it from a copy, or {move}")

    def close(self) -> None:
        """Finish the save in flight (reporting it), rotate, and release the directory."""
        try:
            self.wait()
            self.rotate()
            self.manager.close()
        finally:
            self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def recorded_tokenizer(meta: dict) -> str | None:
    """The fingerprint of the tokenizer a checkpoint was trained with (None: saved before jaxchat recorded it)."""
    return (meta.get("inputs") or {}).get("tokenizer")


def tokenizer_users(fingerprint: str) -> list[str]:
    """'<tag> step <N>' of every checkpoint under base_checkpoints (rolled-back ones too) whose meta record names the
    tokenizer `fingerprint`: what tok_train must not make unusable. Meta records are read as files (no orbax)."""
    root = os.path.join(base_dir(), "base_checkpoints")
    users = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "meta", "metadata")) +
                       glob.glob(os.path.join(root, "*", "rolled_back", "*", "*", "meta", "metadata"))):
        step_dir = os.path.dirname(os.path.dirname(path))
        if not os.path.basename(step_dir).isdigit():  # a save in progress (*.orbax-checkpoint-tmp-*)
            continue
        try:
            with open(path, encoding="utf-8") as f:
                recorded = recorded_tokenizer(json.load(f))
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: it cannot be resumed whatever the tokenizer
        if recorded == fingerprint:
            users.append(f"{os.path.relpath(os.path.dirname(step_dir), root)} step {os.path.basename(step_dir)}")
    return users


def input_changes(saved: dict, now: dict) -> dict:
    """{name: (saved, now)} of the run inputs (meta["inputs"]) that differ; names a checkpoint lacks are skipped."""
    return {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}


class DirectoryLock:
    """`<dir>/.lock` naming the run that writes a checkpoint directory; a second writer refuses with one line.

    The file holds the owner's host and pid: a lock of a process that no longer runs on this host (a run killed
    with SIGKILL) is stale and taken over; one of this very process is left from an earlier call that failed.
    """

    def __init__(self, directory: str):
        self.path = os.path.join(directory, ".lock")
        self.held = False
        self.created = not os.path.isdir(directory)  # removed again on release if nothing was saved in it
        if jax.process_index() != 0:  # process 0 speaks for the run
            return
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the checkpoint directory {directory} ({e.strerror or e}): set "
                            f"JAXCHAT_BASE_DIR to a writable directory") from None
        me = dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(directory)
                continue
            except OSError as e:
                raise UserError(f"cannot write to the checkpoint directory {directory} ({e.strerror or e}): check "
                                f"its permissions and free space, or set JAXCHAT_BASE_DIR elsewhere") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)  # a run that exits with an error releases it too
            return
        raise UserError(f"cannot take the lock {self.path}: another run keeps taking it")

    def _take_over_if_stale(self, directory: str) -> None:
        try:
            with open(self.path) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            owner = {}  # being written right now, or garbage: judged by its age below
        host, pid = owner.get("host"), owner.get("pid")
        if not owner and _age(self.path) < 10:  # just created by another starter: read it again shortly
            time.sleep(0.2)
            return
        alive = _pid_alive(pid) if host == socket.gethostname() and isinstance(pid, int) else host is not None
        if host == socket.gethostname() and pid == os.getpid():
            alive = False  # this process's own, left by an earlier call that failed (tests, notebooks)
        if alive:
            raise UserError(f"another run (pid {pid} on {host}, started {owner.get('started')}) is writing "
                            f"checkpoints to {directory}: wait for it to finish, or use another --model-tag"
                            + ("" if host == socket.gethostname() else
                               f" (if it is gone, delete {self.path})"))
        if pid != os.getpid():
            print0(f"Taking over the stale lock {self.path} of process {pid} on {host}, which no longer runs")
        stale = f"{self.path}.stale.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):  # another starter took it over first: retry the create
            os.replace(self.path, stale)
            os.remove(stale)

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False
            if self.created:
                with contextlib.suppress(OSError):  # only if empty: a run that failed before saving anything
                    os.rmdir(os.path.dirname(self.path))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


class _HeldOrbaxErrors(logging.Filter):
    """Hold orbax's ERROR log records (a failed save logs its traceback from every thread, hundreds of lines) until
    the failure is known: a failure translated into one line drops them, any other failure prints them.

    Also held: asyncio's "Task exception was never retrieved" for orbax's coroutines. After a failed restore, the
    failed reads' tasks are destroyed whenever their event loop lets go of them, on a busy machine after the
    one-line error, even at exit, and each prints a traceback."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and ("orbax" in record.pathname or
                                                (record.name == "asyncio" and "orbax" in record.getMessage())):
            self.records.append(record)
            del self.records[:-200]
            return False
        return True

    def clear(self) -> None:
        self.records = []

    def release(self) -> None:
        records, self.records = self.records, []
        for record in records:
            sys.stderr.write(logging.Formatter("%(levelname)s:%(name)s:%(message)s").format(record) + "\n")


_HELD = _HeldOrbaxErrors()


def _hold_orbax_errors() -> None:
    """Route orbax's error records through _HELD from now on (when a Checkpointer is made, not at import: importing
    jaxchat changes no process-wide logging); adding the filter again is a no-op."""
    logging.getLogger("absl").addFilter(_HELD)
    logging.getLogger("asyncio").addFilter(_HELD)


@contextlib.contextmanager
def _quiet_on_failure():
    """Hold what is written to stderr (fd 2) meanwhile; pass it on unless the block fails.

    A failed restore makes tensorstore's pending callbacks print screenfuls of asyncio tracebacks that would bury
    the one-line error; on success nothing is lost.
    """
    sys.stderr.flush()
    saved, held = os.dup(2), tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    failed = True
    try:
        yield
        failed = False
    finally:
        if failed:
            time.sleep(0.5)  # the failing callbacks finish asynchronously: let them print into `held`
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if not failed:
            held.seek(0)
            if data := held.read():
                os.write(2, data)
        held.close()

