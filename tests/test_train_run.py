"""`python -m jaxchat.train`'s train() end to end on the demo corpus: checkpoints, exact resume, logging (its bad
command lines: tests/test_bad_input.py)."""

import glob
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import TINY_RUN

pytestmark = pytest.mark.slow

TINY = TINY_RUN + ["--num-iterations=6", "--eval-every=3", "--save-every=3"]


@pytest.fixture(scope="module")
def uninterrupted(base_dir):
    from jaxchat.train import train
    return train(TINY + ["--model-tag=a", "--run=offline-test"])


def restore(base_dir, tag, step):
    with ocp.CheckpointManager(base_dir / "base_checkpoints" / tag) as mgr:
        return mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                          opt_state=ocp.args.StandardRestore(),
                                                          meta=ocp.args.JsonRestore()))


def test_run_trains_logs_and_saves(base_dir, uninterrupted):
    losses = uninterrupted["losses"]
    assert sorted(losses) == list(range(6)) and all(np.isfinite(list(losses.values())))
    assert uninterrupted["loop"].min_val_bpb < 20
    assert sorted(int(p.name) for p in (base_dir / "base_checkpoints" / "a").iterdir() if p.name.isdigit()) == [3, 6]
    meta = restore(base_dir, "a", 6)["meta"]
    assert meta["step"] == 6 and meta["model_config"]["n_embd"] == 64 and meta["user_config"]["depth"] == 2
    assert set(meta["loop_state"]) == {"min_val_bpb", "smooth_train_loss", "total_training_time"}
    assert glob.glob(str(base_dir / "tensorboard" / "a" / "events.out.tfevents.*"))
    assert glob.glob(str(base_dir / "wandb" / "offline-run-*" / "run-*.wandb"))


def test_resume_is_bit_identical(base_dir, uninterrupted):
    from jaxchat.train import train
    ckpt = base_dir / "base_checkpoints"
    shutil.copytree(ckpt / "a" / "3", ckpt / "b" / "3")  # the same 3 steps, then a fresh process picks up
    resumed = train(TINY + ["--model-tag=b", "--resume-from-step=last"])
    assert sorted(resumed["losses"]) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed["losses"][step] == uninterrupted["losses"][step]
    a, b = restore(base_dir, "a", 6), restore(base_dir, "b", 6)
    for tree in ("params", "opt_state"):
        for x, y in zip(*(ocp.tree.to_flat_dict(r[tree]).items() for r in (a, b))):
            np.testing.assert_array_equal(x[1], y[1], err_msg=str(x[0]))


def test_checkpoint_restores_onto_another_mesh(base_dir, uninterrupted):
    from jaxchat.train import train
    ckpt = base_dir / "base_checkpoints"
    shutil.copytree(ckpt / "a" / "3", ckpt / "c" / "3")
    resumed = train(TINY + ["--model-tag=c", "--resume-from-step=3", "--fsdp=4"])
    np.testing.assert_allclose([resumed["losses"][s] for s in (3, 4, 5)],
                               [uninterrupted["losses"][s] for s in (3, 4, 5)], rtol=1e-4)


def test_base_eval_on_a_trained_checkpoint(base_dir, uninterrupted, capsys):
    from conftest import shared_fixture
    from jaxchat import base_eval
    bundle = shared_fixture("core_small/eval_bundle")
    base_eval.main(["--model-tag=a", "--eval=core,sample", f"--bundle={bundle}", "--max-per-task=4"])
    out = capsys.readouterr().out
    assert "<|bos|>The capital of France is" in out  # samples decoded with the demo tokenizer the model trained on
    csv = (base_dir / "base_eval" / "base_model_000006.csv").read_text().splitlines()
    assert csv[0].replace(" ", "") == "Task,Accuracy,Centered" and csv[-1].startswith("CORE")
    assert len(csv) == 2 + 5  # header, five tasks of the fixture bundle, CORE
