"""Orbax checkpoints: parameters, optimizer state and a JSON meta record, written atomically.

As nanochat/checkpoint_manager.py save_checkpoint / load_checkpoint (model, optimizer and meta files per step); loading
a model for evaluation is base_eval.load_model_for_eval.

Layout: `$JAXCHAT_BASE_DIR/base_checkpoints/<model_tag>/<step>/{params,opt_state,meta}`. Orbax writes each step into
a temporary directory and renames it when complete, so a crash during a save leaves the previous step usable and the
half-written one is never listed.
"""

import contextlib
import os
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from jaxchat.common import UserError, base_dir


def checkpoint_dir(model_tag: str) -> str:
    return os.path.join(base_dir(), "base_checkpoints", model_tag)


class Checkpointer:
    """Saves and restores training state for one model tag."""

    def __init__(self, directory: str, *, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Start saving step `step` (asynchronously; `wait()` blocks until it is on disk)."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def steps(self) -> list[int]:
        """Complete checkpoints on disk, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def last_complete(self) -> int | None:
        """The newest checkpoint once any save in flight is on disk (None if there is none)."""
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

    def restore(self, step: int, abstract_params, abstract_opt_state=None) -> tuple:
        """(params, opt_state or None, meta) of a step, placed with the shardings of the abstract targets."""
        items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        try:
            with _quiet_on_failure():
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, OSError, TypeError) as e:
            others = [s for s in self.steps() if s != step]
            raise UserError(f"checkpoint {self.directory}/{step} is corrupt or incomplete ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100]}...); resume from an earlier one with "
                            f"--resume-from-step=N, N in {others[-5:]}, or delete it") from None
        return restored["params"], restored.get("opt_state") if abstract_opt_state is not None else None, restored["meta"]

    def prune(self, keep_temporary: int) -> None:
        """Delete all but the newest `keep_temporary` timer/preemption checkpoints; step-based and final ones stay."""
        temporary = [s for s in self.steps() if self.read_meta(s).get("kind") in ("time", "preempt")]
        for step in temporary[: max(0, len(temporary) - keep_temporary)]:
            self.manager.delete(step)

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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


def abstract_like(tree, shardings):
    """ShapeDtypeStructs (with shardings) for a tree of arrays or ShapeDtypeStructs: an orbax restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
