"""jaxchat.runtime.checkpoint's contract, with orbax on disk: save and restore (onto a mesh), the list of complete
steps, 'last', rotation of temporary checkpoints, moving newer steps aside, and one clear line for a missing step or a
corrupt checkpoint. (The lock, full disks and crashes mid-save: tests/test_bad_input.py and tests/test_crash.py.)"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.model import mesh as meshlib
from jaxchat.model.mesh import abstract_like
from jaxchat.runtime.checkpoint import Checkpointer, checkpoint_dir
from jaxchat.runtime.common import UserError


def state(seed: int = 0):
    """A small (params, opt_state) pair shaped like the real trees (nested dicts of float32 and int32 arrays)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"wte": jax.random.normal(k1, (16, 8)), "blocks": {"c_q": jax.random.normal(k2, (2, 8, 8))}}
    opt = {"count": jnp.int32(seed), "mu": jax.tree.map(lambda p: p * 0.5, params)}
    return params, opt


def meta(step: int, kind: str) -> dict:
    return {"step": step, "kind": kind, "loop_state": {"min_val_bpb": 1.5}, "dataloader_states": [{"pq_idx": step}]}


def writer(path, keep_last=None) -> Checkpointer:
    return Checkpointer(str(path), lock=True, keep_last=keep_last)


def test_save_restore_round_trip_onto_a_mesh(tmp_path, capsys):
    params, opt = state(3)
    ckpt = writer(tmp_path / "run")
    ckpt.save(5, params, opt, meta(5, "step"))
    assert ckpt.last_complete() == 5  # waits for the asynchronous save
    assert f"Saved checkpoint step 5 to {tmp_path / 'run'}" in capsys.readouterr().out  # once committed
    mesh = meshlib.make_mesh(fsdp=2)
    shardings = (meshlib.param_shardings(params, mesh), meshlib.optimizer_shardings(opt, mesh))
    targets = (abstract_like(params, shardings[0]), abstract_like(opt, shardings[1]))
    restored_params, restored_opt, restored_meta = ckpt.restore(5, *targets)
    assert restored_meta == meta(5, "step")
    for saved, restored, like in ((params, restored_params, targets[0]), (opt, restored_opt, targets[1])):
        assert jax.tree.structure(saved) == jax.tree.structure(restored)
        for s, r, t in zip(jax.tree.leaves(saved), jax.tree.leaves(restored), jax.tree.leaves(like)):
            np.testing.assert_array_equal(np.asarray(s), np.asarray(r))
            assert r.dtype == s.dtype and r.sharding == t.sharding
    only_params, no_opt, _ = ckpt.restore(5, targets[0])  # evaluation restores the parameters alone
    assert no_opt is None and np.array_equal(np.asarray(only_params["wte"]), np.asarray(params["wte"]))
    ckpt.close()


def test_steps_last_and_missing_steps(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in .*train first, or check --model-tag"):
        Checkpointer(str(tmp_path / "nothing"))  # a reader creates nothing
    assert not (tmp_path / "nothing").exists()
    ckpt = writer(tmp_path / "run")
    with pytest.raises(UserError, match="no checkpoint in .*train first, or check --model-tag"):
        ckpt.resolve_step("last")
    assert ckpt.steps() == [] and ckpt.last_complete() is None
    for step in (2, 10, 4):
        ckpt.save(step, *state(step), meta(step, "step"))
    ckpt.wait()
    assert ckpt.steps() == [2, 4, 10]
    assert ckpt.resolve_step("last") == 10 and ckpt.resolve_step("4") == 4 and ckpt.resolve_step(2) == 2
    with pytest.raises(UserError, match=r"no checkpoint for step 7 .*available steps: \[2, 4, 10\]"):
        ckpt.resolve_step(7)
    assert ckpt.read_meta(4) == meta(4, "step")
    ckpt.close()
    assert Checkpointer(str(tmp_path / "run")).steps() == [2, 4, 10]  # a reader (evaluation) sees the same


def test_rotation_keeps_step_and_final_checkpoints(tmp_path):
    ckpt = writer(tmp_path / "run", keep_last=2)
    kinds = {1: "time", 2: "step", 3: "preempt", 4: "time", 5: "time", 6: "final"}
    for step, kind in kinds.items():
        ckpt.save(step, *state(step), meta(step, kind))
    ckpt.close()
    # The two newest temporary ones, and every --save-every / final one.
    assert Checkpointer(str(tmp_path / "run")).steps() == [2, 4, 5, 6]


def test_newer_steps_are_moved_aside_not_deleted(tmp_path):
    ckpt = writer(tmp_path / "run")
    for step in (1, 2, 3):
        ckpt.save(step, *state(step), meta(step, "step"))
    ckpt.wait()
    assert ckpt.move_aside_after(3) is None
    aside = ckpt.move_aside_after(1)  # a rollback to step 1
    assert ckpt.steps() == [1] and sorted(os.listdir(aside)) == ["2", "3"]
    assert os.path.dirname(aside) == str(tmp_path / "run" / "rolled_back")
    ckpt.close()


def test_a_corrupt_checkpoint_is_one_line_naming_the_others(tmp_path):
    ckpt = writer(tmp_path / "run")
    for step in (1, 2):
        ckpt.save(step, *state(step), meta(step, "step"))
    ckpt.wait()
    for path in (tmp_path / "run" / "2" / "params").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the array data files: cut short, as by a full disk
            path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])
    params, opt = state(0)
    with pytest.raises(UserError) as e:
        ckpt.restore(2, abstract_like(params, jax.tree.map(lambda x: x.sharding, params)),
                     abstract_like(opt, jax.tree.map(lambda x: x.sharding, opt)))
    assert f"checkpoint {tmp_path / 'run'}/2 is corrupt or incomplete" in str(e.value)
    assert "--resume-from-step=N, N in [1]" in str(e.value) and "\n" not in str(e.value)
    assert f"or move {tmp_path / 'run'}/2 out of" in str(e.value) and "delete" not in str(e.value)
    ckpt.close()
    # A reader (base_eval, export) picks a step with --step: its advice names that flag.
    reader = Checkpointer(str(tmp_path / "run"), async_save=False, step_flag="--step")
    with pytest.raises(UserError, match=r"use another step with --step=N, N in \[1\]"):
        reader.restore(2, abstract_like(params, jax.tree.map(lambda x: x.sharding, params)))


def test_asyncio_tracebacks_of_orbax_tasks_are_held(caplog):
    """After a failed restore, asyncio reports each failed read's task when it is destroyed, which on a busy machine
    can be after the one-line error: those records (orbax coroutines) are held; other asyncio errors print."""
    import logging
    log = logging.getLogger("asyncio")
    log.error("Task exception was never retrieved\nfuture: <Task finished name='Task-7' coro=<async_deserialize() "
              "done, defined at /site-packages/orbax/checkpoint/_src/serialization/serialization.py:405> "
              "exception=ValueError('Error reading')>")
    log.error("Task exception was never retrieved\nfuture: <Task finished coro=<fetch() done, defined at /app.py:3>>")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "orbax" not in logged and "async_deserialize" not in logged
    assert "fetch() done" in logged


def test_checkpoint_dir_is_under_the_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    assert checkpoint_dir("d12") == str(tmp_path / "base_checkpoints" / "d12")


def test_abstract_like_keeps_shapes_dtypes_and_shardings():
    mesh = meshlib.make_mesh(fsdp=1)
    tree = {"a": jax.ShapeDtypeStruct((8, 3), jnp.bfloat16), "b": jnp.zeros((2,), jnp.int32)}
    shardings = {"a": meshlib.row_sharding(mesh), "b": meshlib.replicated(mesh)}
    like = abstract_like(tree, shardings)
    assert (like["a"].shape, like["a"].dtype, like["a"].sharding) == ((8, 3), jnp.bfloat16, shardings["a"])
    assert (like["b"].shape, like["b"].dtype, like["b"].sharding) == ((2,), jnp.int32, shardings["b"])


def test_the_space_check_uses_the_size_on_disk(tmp_path):
    """The state compresses on disk (here bf16-valued float32: 10 MiB in memory, about 5 MB on disk): the check before
    a save estimated it at its in-memory size and refused saves that fit. A 14 MiB file system holds two."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:80]}): needs root")
    try:
        ckpt = writer(mount / "run")
        for step in (1, 2):
            x = np.random.default_rng(step).standard_normal(10 * 2**18).astype(np.float32)
            params = {"w": jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)}  # 10 MiB in memory
            ckpt.save(step, params, {"m": jnp.zeros(3)}, meta(step, "step"))
            ckpt.wait()
        assert ckpt.steps() == [1, 2]
        ckpt.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
