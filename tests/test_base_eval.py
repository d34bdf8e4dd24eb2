"""base_eval: loading a jaxchat checkpoint for evaluation, --eval bpb (train and val bits per byte), the CSV."""

import math
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shared_fixture

from jaxchat import base_eval
from jaxchat.data import dataset
from jaxchat.runtime.common import UserError

WORDS = ("the cat sat on a mat while seven birds sang about rivers, stones and 42 quiet lamps; "
         "every morning she wrote letters to distant friends").split()


@pytest.fixture(scope="module")
def fixture_model():
    from jaxchat.data.tokenizer import Tokenizer
    from jaxchat.interop.convert import model_from_reference, read_reference_npz

    root = shared_fixture("core_small")
    config, state, _ = read_reference_npz(str(root / "model.npz"))
    return model_from_reference(config, state), Tokenizer.load(str(root / "tokenizer")), root


@pytest.fixture
def base(tmp_path, monkeypatch):
    """$JAXCHAT_BASE_DIR with a two-shard fineweb-edu layout (train shard 0, pinned val shard) of made-up text."""
    rng = random.Random(0)
    d = tmp_path / "base_data"
    d.mkdir()
    for index in (0, dataset.SOURCES["fineweb-edu"]["max_index"]):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) for _ in range(300)]
        pq.write_table(pa.table({"text": docs}), str(d / dataset.shard_name(index)), row_group_size=64)
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def reference_bpb(model, tokenizer, split: str, rows: int, steps: int) -> float:
    """Plain bits per byte: per-token losses of the model on the loader's first batches, weighted by token bytes."""
    from jaxchat.data.dataloader import DataLoader

    loader = DataLoader(tokenizer, dataset.list_shards("fineweb-edu", split), rows, model.config.sequence_len,
                        rank=0, world_size=1)
    token_bytes = tokenizer.get_token_bytes()
    nats, nbytes = 0.0, 0
    for _ in range(steps):
        inputs, targets = next(loader)
        losses = np.asarray(model(inputs, targets, reduction="none"), np.float64)
        counted = token_bytes[targets]
        nats += float((losses * (counted > 0)).sum())
        nbytes += int(counted.sum())
    loader.close()
    return nats / (math.log(2) * nbytes)


@pytest.mark.slow
def test_split_bpb_matches_a_plain_computation(fixture_model, base, capsys):
    model, tokenizer, _ = fixture_model
    tokens_per_step = 1 * model.config.sequence_len * jax.device_count()
    got = base_eval.split_bpb(model, tokenizer, "fineweb-edu", 1, 2 * tokens_per_step + 100)
    out = capsys.readouterr().out
    assert f"Adjusted split_tokens to {2 * tokens_per_step}" in out and "val bpb: " in out
    for split in ("train", "val"):
        assert got[split] == pytest.approx(reference_bpb(model, tokenizer, split, jax.device_count(), 2), rel=1e-5)
    assert got["train"] != got["val"]  # different documents
    with pytest.raises(UserError, match="--split-tokens=100 is less than one batch"):
        base_eval.split_bpb(model, tokenizer, "fineweb-edu", 1, 100)


@pytest.mark.slow
@pytest.mark.entry
def test_bpb_on_the_command_line(fixture_model, base):
    model, tokenizer, root = fixture_model
    tokens_per_step = 1 * model.config.sequence_len * jax.device_count()
    proc = subprocess.run([sys.executable, "-m", "jaxchat.base_eval", "--nanochat-checkpoint", str(root / "model.npz"),
                           "--tokenizer-dir", str(root / "tokenizer"), "--eval", "bpb", "--device-batch-size", "1",
                           "--split-tokens", str(tokens_per_step)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAXCHAT_BASE_DIR=str(base)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"Evaluating {root / 'model.npz'}\n")  # which model (and step, where known)
    printed = {line.split()[0]: float(line.split()[-1]) for line in proc.stdout.splitlines() if " bpb: " in line}
    assert set(printed) == {"train", "val"}
    for split, value in printed.items():
        assert value == pytest.approx(reference_bpb(model, tokenizer, split, jax.device_count(), 1), abs=2e-6)


def test_missing_data_for_bpb_names_the_command(fixture_model, tmp_path, monkeypatch):
    model, tokenizer, _ = fixture_model
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="python -m jaxchat.dataset"):
        base_eval.split_bpb(model, tokenizer, "fineweb-edu", 1, 10**6)


def test_write_csv_is_nanochats_format(tmp_path):
    results = {"core": 0.25, "tasks": {"arith": {"accuracy": 0.5, "centered": 0.375}}}
    text = base_eval.write_csv(str(tmp_path / "out" / "m.csv"), results)
    assert text.splitlines() == [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}",
                                 f"{'arith':<35}, {'0.500000':<10}, {'0.375000':<10}",
                                 f"{'CORE':<35}, {'':<10}, {'0.250000':<10}"]
    assert (tmp_path / "out" / "m.csv").read_text() == text
