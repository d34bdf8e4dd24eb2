"""Best-fit loader against nanochat's batches of loader_small, a plain port of nanochat/dataloader.py
tokenizing_distributed_data_loader_with_state_bos_bestfit, and exact resume."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import shared_fixture

from jaxchat.data.dataloader import DataLoader, check_resume_shards
from jaxchat.data.dataset import list_shards
from jaxchat.data.tokenizer import Tokenizer
from jaxchat.runtime.common import UserError


@pytest.fixture(scope="module")
def fx():
    root = shared_fixture("loader_small")
    npz = np.load(root / "batches.npz")
    data = {k: npz[k] for k in npz.files}
    meta = json.loads(str(data["meta"]))
    tok = Tokenizer.load(str(root / "tokenizer"))
    assert tok.bos_id == meta["bos"]
    files = {split: list_shards(str(root / "base_data"), split) for split in ("train", "val")}
    assert files["val"][0].endswith(meta["val_shard"])
    return dict(data=data, meta=meta, tok=tok, files=files)


def make(fx, split="train", rank=0, world=1, **kw) -> DataLoader:
    m = fx["meta"]
    return DataLoader(fx["tok"], fx["files"][split], m["B"], m["T"], rank=rank, world_size=world,
                      buffer_size=m["buffer_size"], tokenizer_batch_size=m["tokenizer_batch_size"], **kw)


def take(loader: DataLoader, n: int) -> tuple[list, list]:
    """n batches and the state after each; closes the loader."""
    batches, states = [], []
    for _ in range(n):
        batches.append(next(loader))
        states.append(loader.get_state())
    loader.close()
    return batches, states


def reference_port(fx, files, n, rank=0, world=1):
    """nanochat/dataloader.py tokenizing_distributed_data_loader_with_state_bos_bestfit as plainly as nanochat writes it
    (lists, pop, linear scans): the oracle for every batch."""
    m, enc, bos = fx["meta"], fx["tok"].enc, fx["tok"].bos_id

    def chunks():
        epoch = 1
        while True:
            for path in files:
                pf = pq.ParquetFile(path)
                for g in range(rank, pf.num_row_groups, world):
                    texts = pf.read_row_group(g).column("text").to_pylist()
                    for i in range(0, len(texts), m["tokenizer_batch_size"]):
                        yield texts[i:i + m["tokenizer_batch_size"]]
            epoch += 1

    stream, buffer, out, cap = chunks(), [], [], m["T"] + 1
    for _ in range(n):
        rows = []
        for _ in range(m["B"]):
            row = []
            while len(row) < cap:
                while len(buffer) < m["buffer_size"]:
                    buffer += [[bos] + ids for ids in enc.encode_ordinary_batch(next(stream))]
                remaining, best, best_len = cap - len(row), -1, 0
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= remaining:
                        best, best_len = i, len(doc)
                if best >= 0:
                    row += buffer.pop(best)
                else:
                    row += buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))[:remaining]
            rows.append(row)
        rows = np.array(rows)
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def check_fixture(batches, fx_inputs, fx_targets):
    """Compare with the fixture's batches. The fixture generator kept references to the reference loader's reused
    output buffer, so when all its entries are identical they all hold the LAST batch: compare that one then."""
    aliased = all((fx_inputs[i] == fx_inputs[-1]).all() for i in range(len(fx_inputs)))
    pairs = [(batches[-1], (fx_inputs[-1], fx_targets[-1]))] if aliased else zip(batches, zip(fx_inputs, fx_targets))
    for (x, y), (fx_x, fx_y) in pairs:
        np.testing.assert_array_equal(x, fx_x)
        np.testing.assert_array_equal(y, fx_y)


def assert_same(batches, expected):
    assert len(batches) == len(expected)
    for k, ((x, y), (ex, ey)) in enumerate(zip(batches, expected)):
        assert x.dtype == np.int32 and x.shape == ex.shape, k
        assert np.array_equal(x, ex) and np.array_equal(y, ey), f"batch {k} differs"


@pytest.fixture(scope="module")
def w1(fx):
    return take(make(fx), 40)


def test_one_process_matches_reference(fx, w1):
    batches, states = w1
    d = fx["data"]
    check_fixture(batches, d["w1_inputs"], d["w1_targets"])
    assert [[s["pq_idx"], s["rg_idx"], s["epoch"]] for s in states] == d["w1_state"].tolist()
    assert states[-1]["epoch"] == 2  # the run crosses an epoch boundary
    assert_same(batches, reference_port(fx, fx["files"]["train"], 40))
    for x, y in batches:
        assert (x[:, 0] == fx["tok"].bos_id).all()  # every row starts with BOS
        assert np.array_equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("rank", [0, 1])
def test_two_processes_match_reference(fx, rank):
    batches, states = take(make(fx, rank=rank, world=2), 20)
    d = fx["data"]
    check_fixture(batches, d[f"w2_r{rank}_inputs"], d[f"w2_r{rank}_targets"])
    assert [[s["pq_idx"], s["rg_idx"], s["epoch"]] for s in states] == d[f"w2_r{rank}_state"].tolist()
    assert_same(batches, reference_port(fx, fx["files"]["train"], 20, rank, 2))


def test_val_matches_reference_and_repeats(fx):
    d = fx["data"]
    first, _ = take(make(fx, "val"), 4)
    check_fixture(first, d["val_inputs"], d["val_targets"])
    assert_same(first, reference_port(fx, fx["files"]["val"], 4))
    again, _ = take(make(fx, "val"), 4)
    assert_same(again, first)


def test_exact_resume(fx, w1):
    """A state taken after k consumed batches (prefetching runs ahead) continues bit for bit in a fresh loader."""
    batches, states = w1
    epochs = [s["epoch"] for s in states]
    boundary = epochs.index(2)
    for k in sorted({0, 3, boundary - 1, boundary, boundary + 1, 33}):
        state = json.loads(json.dumps(states[k]))  # as stored in a checkpoint's meta json
        loader = make(fx)
        loader.set_state(state)
        assert loader.get_state() == state
        resumed, _ = take(loader, 4)
        assert_same(resumed, batches[k + 1:k + 5])


def test_exact_resume_mid_run_two_processes(fx):
    batches, states = take(make(fx, rank=1, world=2), 12)
    loader = make(fx, rank=1, world=2)
    for _ in range(3):
        next(loader)
    loader.set_state(states[6])  # set_state on a running loader discards what it had prefetched
    resumed, _ = take(loader, 5)
    assert_same(resumed, batches[7:12])


def test_reference_style_state_resumes_at_next_round(fx):
    loader = make(fx)
    loader.set_state({"pq_idx": 2, "rg_idx": 1, "epoch": 1})  # nanochat's state: approximate resume
    next(loader)
    state = loader.get_state()
    loader.close()
    # the first chunk read is row group 2 of file 2; the first batch then needs the next files (epoch 2)
    assert state["buffer"][0][:2] == [2, 2]


def test_rank_without_row_groups_is_a_user_error(fx):
    loader = make(fx, "val", rank=2, world=3)  # the val shard has 2 row groups
    with pytest.raises(UserError, match="rank 2 of 3"):
        next(loader)
    loader.close()


def _copies(fx, directory, names=None) -> list[str]:
    """Copies of the train shards (all, or those named) in a new directory: the same names and contents, new files."""
    directory.mkdir()
    return sorted(shutil.copy(path, directory) for path in fx["files"]["train"]
                  if names is None or os.path.basename(path) in names)


def test_resume_on_changed_shards_refuses_or_continues_by_name(fx, w1, tmp_path):
    """The state names its shards: a removed or rewritten file is one line naming it and the flag; with the flag the
    position is found by name (file numbers shift); with shards only added the resume stays bit for bit."""
    batches, states = w1
    k = 10  # shards 0 and 1 consumed, the loader reads shard 2 (the fixture's w1_state)
    assert (states[k]["pq_idx"], states[k]["epoch"]) == (2, 1) and states[k + 5]["epoch"] == 1
    state = json.loads(json.dumps(states[k]))  # as stored in a checkpoint's meta json
    assert [s[0] for s in state["shards"]] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    m = fx["meta"]

    def loader(files):
        return DataLoader(fx["tok"], files, m["B"], m["T"], rank=0, world_size=1, buffer_size=m["buffer_size"],
                          tokenizer_batch_size=m["tokenizer_batch_size"])

    # A consumed shard removed: file number 2 no longer exists (before: IndexError, or silently another file).
    files = _copies(fx, tmp_path / "removed", {"shard_00001.parquet", "shard_00002.parquet"})
    with pytest.raises(UserError) as e:
        loader(files).set_state(state)
    assert "removed: shard_00000.parquet" in str(e.value) and "--allow-data-change=true" in str(e.value)
    assert "\n" not in str(e.value)
    resumed = loader(files)
    resumed.set_state(state, allow_data_change=True)  # accepted: the removed file's buffered documents are dropped
    moved = resumed.get_state()
    assert moved["pq_idx"] == moved["next"]["pq_idx"] == 1  # the same file, now number 1, at the same row group
    assert moved["next"]["rg_idx"] == state["next"]["rg_idx"] and moved["next"]["row"] == state["next"]["row"]
    assert moved["buffer"] == [[p - 1, g, rows] for p, g, rows in state["buffer"] if p > 0]
    x, _ = take(resumed, 1)[0][0]
    assert (x[:, 0] == fx["tok"].bos_id).all()

    # A shard rewritten with other documents under the same name.
    files = _copies(fx, tmp_path / "rewritten")
    with open(files[1], "wb") as f, open(files[0], "rb") as g:
        f.write(g.read())
    with pytest.raises(UserError, match=r"other content: shard_00001\.parquet \(size 40333, now 62515\)"):
        loader(files).set_state(state)

    # Shards only added: a note, and the resume is exact.
    files = _copies(fx, tmp_path / "added")
    files.append(shutil.copy(files[0], tmp_path / "added" / "shard_00009.parquet"))
    note = check_resume_shards(state, loader(files).shards())
    assert "added since the loader state was saved (shard_00009.parquet): the loader reads them" in note
    resumed = loader(files)
    resumed.set_state(state)
    assert_same(take(resumed, 4)[0], batches[k + 1:k + 5])

    # A state saved before states named their shards resumes as it did (exactly, by file number), with a line where
    # it is checked before compiling; a file number that no longer exists is one line.
    legacy = {key: v for key, v in state.items() if key != "shards"}
    assert "resuming by file number" in check_resume_shards(legacy, loader(fx["files"]["train"]).shards())
    resumed = loader(fx["files"]["train"])
    resumed.set_state(legacy)
    assert_same(take(resumed, 4)[0], batches[k + 1:k + 5])
    with pytest.raises(UserError, match="reading train shard number 2, but only 2 train shard"):
        loader(files[:2]).set_state(legacy)
