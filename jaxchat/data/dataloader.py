"""BOS-aligned best-fit packing loader on grain, with exact resume.

As nanochat/dataloader.py tokenizing_distributed_data_loader_with_state_bos_bestfit: documents of this rank's row
groups, each prefixed with BOS, packed best-fit into rows of T+1 tokens; a row that nothing fits is filled by
cropping the shortest document.

Pipeline: _ChunkIterator (read this rank's row groups, tokenize 128-doc chunks) -> thread prefetch -> _PackIterator
(document buffer, best-fit rows) -> thread prefetch -> DataLoader. Each prefetch stage records the state of the
element it hands out, so get_state() always describes what the caller consumed, never what is prefetched.

The state names documents by (file, row group, row) instead of storing tokens: a fresh loader re-reads and
re-tokenizes the buffered documents and then continues bit for bit (nanochat drops its buffer on resume). File numbers
index the list of shards the state also records, each by name, size and footer hash (dataset.shard_identity): a
resume on shards that were removed or rewritten since is refused in one line (a file number would otherwise name
another file), or, when the caller accepts the change, continues by name on what is present.
"""

import copy
import os
import sys
from dataclasses import dataclass

import grain
import jax
import numpy as np
from grain.experimental import ThreadPrefetchDatasetIterator

from jaxchat.data import dataset
from jaxchat.data import tokenizer as toklib
from jaxchat.data.dataset import open_shard, read_texts, shard_identities
from jaxchat.data.tokenizer import Tokenizer
from jaxchat.runtime.common import UserError, print0

CHUNK_PREFETCH = 16  # tokenized chunks read ahead; a refill takes up to ~8 of them at the start


def _no_documents(files: list[str], rank: int, world: int) -> UserError:
    """No document for this rank: every file empty, or fewer non-empty row groups than ranks."""
    groups = [open_shard(f).metadata for f in files]
    if sum(m.num_rows for m in groups) == 0:
        return UserError(f"all {len(files)} shard(s) starting {files[0]} hold no documents: delete them and re-run "
                         f"the command that fetched them (python -m jaxchat.dataset ...)")
    return UserError(f"rank {rank} of {world} gets no row group of {len(files)} file(s) starting {files[0]}: use "
                     f"fewer processes or --data-shards, or more/larger shards")


# ----------------------------------------------------------------------------------------------------------------
# The shards a state was saved on against the shards present now

ALLOW_FLAG = "--allow-data-change=true"  # the training flag that accepts changed shards on resume


def shard_changes(saved: list, now: list) -> dict[str, list[str]]:
    """{"removed", "changed", "added": file names} between two shard lists (dataset.shard_identities)."""
    old = {name: tuple(rest) for name, *rest in saved}
    new = {name: tuple(rest) for name, *rest in now}
    return {"removed": [n for n in old if n not in new], "changed": [n for n in old if n in new and old[n] != new[n]],
            "added": [n for n in new if n not in old]}


def _names(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_resume_shards(state: dict, now: list, allow_change: bool = False,
                        where: str = "the loader state was saved") -> str | None:
    """None when `state` was saved on the shards `now` (dataset.shard_identities of this loader's files); else a line
    that says what the resume does (shards only added, or changes accepted with allow_change), or a UserError that
    says what changed and how to continue.

    A state without a shard list (saved before states recorded one, or nanochat's) can only be checked for file
    numbers that no longer exist."""
    if "shards" not in state:
        numbers = [int(state.get("pq_idx", 0)), int(state.get("next", {}).get("pq_idx", 0))]
        numbers += [int(p) for p, _, _ in state.get("buffer", [])]
        if max(numbers) >= len(now):
            raise UserError(f"{where} reading train shard number {max(numbers)}, but only {len(now)} train shard(s) "
                            f"are present: restore the shards the run was trained on")
        return (f"{where} before loader states named their shards: resuming by file number, without checking that "
                f"the files are the same")
    changes = shard_changes(state["shards"], now)
    if not any(changes.values()):
        return None
    saved = {name: rest for name, *rest in state["shards"]}
    current = {name: rest for name, *rest in now}
    parts = ([f"removed: {_names(changes['removed'])}"] if changes["removed"] else []) + (
        [f"other content: {_names([f'{n} (size {saved[n][0]}, now {current[n][0]})' for n in changes['changed']])}"]
        if changes["changed"] else [])
    added = f"{len(changes['added'])} added ({_names(changes['added'])})" if changes["added"] else ""
    if parts and not allow_change:
        raise UserError(f"the train shards changed since {where} ({'; '.join(parts)}): restore them to resume exactly "
                        f"where the run stopped, or add {ALLOW_FLAG} to continue on the shards present now")
    if parts:
        return (f"train shards changed since {where} ({'; '.join(parts + ([added] if added else []))}): continuing "
                f"as {ALLOW_FLAG} asks, at the recorded position found by file name (past a removed file: the next "
                f"name; in a rewritten one: its start); buffered documents of those files are dropped")
    return (f"train shards added since {where} ({_names(changes['added'])}): the loader reads them when it reaches "
            f"them in name order; the documents read so far are unchanged")


def _renumber(state: dict, now: list, rank: int) -> dict:
    """The state's file numbers moved to the same files' places in `now`; buffered documents of removed or rewritten
    files dropped; a position in such a file moved to the start of the rewritten file, or to the next file by name."""
    saved = state["shards"]
    index = {name: i for i, (name, *_) in enumerate(now)}
    same = {i: index[name] for i, (name, *rest) in enumerate(saved)
            if name in index and list(now[index[name]][1:]) == list(rest)}

    def place(p: int) -> tuple[int, bool]:  # (file number now, whether the position inside the file still holds)
        if p in same:
            return same[p], True
        if p >= len(saved):  # past the last file: the next epoch
            return len(now), False
        name = saved[p][0]
        if name in index:
            return index[name], False
        return next((i for i, (n, *_) in enumerate(now) if n > name), len(now)), False  # len(now): the next epoch

    state = {k: v for k, v in state.items() if k != "shards"}
    pq_idx, _ = place(int(state["pq_idx"]))
    state["pq_idx"] = pq_idx
    if "next" in state:
        p, kept = place(int(state["next"]["pq_idx"]))
        state["next"] = dict(state["next"], pq_idx=p) if kept else dict(state["next"], pq_idx=p, rg_idx=rank, row=0)
    if "buffer" in state:
        state["buffer"] = [[same[p], g, rows] for p, g, rows in state["buffer"] if p in same]
    return state


class _QuietClose:
    """grain iterators close (stop their threads) when collected; skip that at interpreter exit, where it fails."""

    def __del__(self):
        if not sys.is_finalizing():
            try:
                self.close()
            except Exception:
                pass


class _Prefetch(_QuietClose, ThreadPrefetchDatasetIterator):
    """grain's thread prefetcher: the state it reports is that of the last element handed out."""


@dataclass
class _Chunk:
    tokens: list[np.ndarray]  # BOS-prefixed token ids per document
    epoch: int
    pq_idx: int
    rg_idx: int
    row: int  # row of the first document within its row group


class _ChunkIterator(grain.DatasetIterator):
    """Endless tokenized chunks of this rank's documents: row groups rank, rank+W, ... of each file, file by file."""

    def __init__(self, files: list[str], tokenizer: Tokenizer, rank: int, world_size: int, chunk_size: int, threads: int):
        super().__init__()
        self.files, self.tok, self.rank, self.world = files, tokenizer, rank, world_size
        self.chunk_size, self.threads = chunk_size, threads
        self._next = {"epoch": 1, "pq_idx": 0, "rg_idx": rank, "row": 0}
        self._rows: dict[int, list[int]] = {}  # file index -> documents per row group (from the parquet footer)
        self._cached: tuple[tuple[int, int], list[str]] | None = None

    def _rg_rows(self, pq_idx: int) -> list[int]:
        if pq_idx not in self._rows:
            meta = open_shard(self.files[pq_idx]).metadata
            self._rows[pq_idx] = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        return self._rows[pq_idx]

    def _advance(self, epoch: int, p: int, g: int, row: int) -> tuple[int, int, int, int]:
        """First position at or after (epoch, p, g, row) that holds a document."""
        wraps = 0
        while True:
            if p >= len(self.files):
                epoch, p, g, row, wraps = epoch + 1, 0, self.rank, 0, wraps + 1
                if wraps > 1:  # a whole pass without one document for this rank
                    raise _no_documents(self.files, self.rank, self.world)
            rows = self._rg_rows(p)
            if g >= len(rows):
                p, g, row = p + 1, self.rank, 0
            elif row >= rows[g]:
                g, row = g + self.world, 0
            else:
                return epoch, p, g, row

    def __next__(self) -> _Chunk:
        epoch, p, g, row = self._advance(*(self._next[k] for k in ("epoch", "pq_idx", "rg_idx", "row")))
        if self._cached is None or self._cached[0] != (p, g):
            self._cached = ((p, g), read_texts(self.files[p], g))
        texts = self._cached[1][row:row + self.chunk_size]
        ids = self.tok.encode(texts, prepend_bos=True, num_threads=self.threads)
        self._next = {"epoch": epoch, "pq_idx": p, "rg_idx": g, "row": row + len(texts)}
        return _Chunk([np.asarray(t, dtype=np.int32) for t in ids], epoch, p, g, row)

    def get_state(self) -> dict:
        return dict(self._next)

    def set_state(self, state: dict) -> None:
        self._next = {k: int(state[k]) for k in ("epoch", "pq_idx", "rg_idx", "row")}


class _PackIterator(grain.DatasetIterator):
    """(inputs, targets) batches packed best-fit from a buffer of whole BOS-prefixed documents (nanochat/dataloader.py
    tokenizing_distributed_data_loader_with_state_bos_bestfit)."""

    def __init__(self, files: list[str], tokenizer: Tokenizer, B: int, T: int, rank: int, world_size: int, buffer_size: int,
                 tokenizer_batch_size: int, tokenizer_threads: int):
        if not files:
            raise UserError("the data loader got no parquet files")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        chunks = _Prefetch(
            _ChunkIterator(files, tokenizer, rank, world_size, tokenizer_batch_size, tokenizer_threads),
            CHUNK_PREFETCH)
        super().__init__(chunks)
        self.files, self.tok, self.B, self.T = files, tokenizer, B, T
        self.rank, self.world, self.buffer_size, self.threads = rank, world_size, buffer_size, tokenizer_threads
        self._chunks = chunks
        self._last = (0, 0, 1)  # (pq_idx, rg_idx, epoch) of the most recently read chunk, as nanochat reports
        self._reset_buffer()

    # The buffer is a slot array in arrival order; a taken document leaves a hole (length 0) instead of shifting
    # the list, and holes are compacted away when slots run out. Best fit is then two vectorised scans.
    def _reset_buffer(self, capacity: int = 4096) -> None:
        self._docs: list[np.ndarray | None] = [None] * capacity
        self._lens = np.zeros(capacity, dtype=np.int64)
        self._refs = np.zeros((capacity, 3), dtype=np.int64)  # (pq_idx, rg_idx, row) of each slot
        self._n = 0  # slots used
        self._live = 0  # documents in the buffer

    def _append(self, docs: list[np.ndarray], refs: np.ndarray) -> None:
        k = len(docs)
        if self._n + k > len(self._lens):
            keep = np.flatnonzero(self._lens[:self._n])
            capacity = max(len(self._lens), 2 * (len(keep) + k))
            docs_kept = [self._docs[i] for i in keep]
            lens, ref_rows = self._lens[keep], self._refs[keep]
            self._reset_buffer(capacity)
            self._docs[:len(keep)] = docs_kept
            self._lens[:len(keep)], self._refs[:len(keep)] = lens, ref_rows
            self._n = self._live = len(keep)
        n = self._n
        self._docs[n:n + k] = docs
        self._lens[n:n + k] = [len(d) for d in docs]
        self._refs[n:n + k] = refs
        self._n, self._live = n + k, self._live + k

    def _take(self, i: int) -> np.ndarray:
        doc = self._docs[i]
        self._docs[i] = None
        self._lens[i] = 0
        self._live -= 1
        return doc

    def _refill(self) -> None:
        chunk = next(self._chunks)
        refs = np.array([(chunk.pq_idx, chunk.rg_idx, chunk.row + j) for j in range(len(chunk.tokens))], np.int64)
        self._append(chunk.tokens, refs.reshape(-1, 3))
        self._last = (chunk.pq_idx, chunk.rg_idx, chunk.epoch)

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        capacity = self.T + 1
        rows = np.empty((self.B, capacity), dtype=np.int32)
        for b in range(self.B):
            pos = 0
            while pos < capacity:
                while self._live < self.buffer_size:
                    self._refill()
                remaining = capacity - pos
                lens = self._lens[:self._n]
                fits = np.where(lens <= remaining, lens, 0)
                i = int(fits.argmax())  # longest that fits; argmax takes the first on ties, like nanochat
                if fits[i] > 0:
                    doc = self._take(i)
                    rows[b, pos:pos + len(doc)] = doc
                    pos += len(doc)
                else:  # nothing fits: crop the shortest document (first on ties) to fill the row
                    i = int(np.where(lens > 0, lens, np.iinfo(np.int64).max).argmin())
                    rows[b, pos:] = self._take(i)[:remaining]
                    pos = capacity
        return rows[:, :-1].copy(), rows[:, 1:].copy()

    def get_state(self) -> dict:
        live = self._refs[:self._n][self._lens[:self._n] > 0]
        # Runs of consecutive documents from one row group: [pq_idx, rg_idx, [rows...]], in buffer order.
        cut = np.flatnonzero(np.any(live[1:, :2] != live[:-1, :2], axis=1)) + 1
        runs = [[int(r[0, 0]), int(r[0, 1]), r[:, 2].tolist()] for r in np.split(live, cut) if len(r)]
        pq_idx, rg_idx, epoch = self._last
        return {"pq_idx": pq_idx, "rg_idx": rg_idx, "epoch": epoch, "next": self._chunks.get_state(),
                "buffer": runs, "rank": self.rank, "world_size": self.world}

    def set_state(self, state: dict) -> None:
        exact = "buffer" in state and state.get("rank") == self.rank and state.get("world_size") == self.world
        pq_idx, rg_idx, epoch = int(state["pq_idx"]), int(state["rg_idx"]), int(state.get("epoch", 1))
        self._reset_buffer()
        self._last = (pq_idx, rg_idx, epoch)
        if not exact:
            # nanochat/dataloader.py _document_batches' resume: empty buffer, restart at the next round of row
            # groups. Used for nanochat's states and for a state saved by another rank or world size.
            if "buffer" in state:
                print(f"warning: data loader state of rank {state.get('rank')}/{state.get('world_size')} given to "
                      f"rank {self.rank}/{self.world}: approximate resume (buffer dropped)", file=sys.stderr)
            nxt = {"epoch": epoch, "pq_idx": pq_idx, "rg_idx": (rg_idx // self.world + 1) * self.world + self.rank,
                   "row": 0}
            self._chunks.set_state(nxt)
            return
        self._chunks.set_state(state["next"])
        texts, refs, cache = [], [], {}
        for p, g, rows in state["buffer"]:
            if (p, g) not in cache:
                cache[(p, g)] = read_texts(self.files[p], g)
            texts += [cache[(p, g)][r] for r in rows]
            refs += [(p, g, r) for r in rows]
        if texts:
            ids = self.tok.encode(texts, prepend_bos=True, num_threads=self.threads)
            self._append([np.asarray(t, dtype=np.int32) for t in ids], np.array(refs, np.int64))


class BestFitDataset(grain.IterDataset):
    """grain dataset of this rank's packed (inputs, targets) batches; iter() gives a checkpointable iterator."""

    def __init__(self, tokenizer: Tokenizer, files: list[str], B: int, T: int, rank: int = 0, world_size: int = 1,
                 buffer_size: int = 1000, tokenizer_batch_size: int = 128, tokenizer_threads: int = 4):
        super().__init__()
        self._args = (files, tokenizer, B, T, rank, world_size, buffer_size, tokenizer_batch_size, tokenizer_threads)

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(*self._args)


class DataLoader(_QuietClose, grain.DatasetIterator):
    """Endless (inputs, targets) int32 (B, T) batches for this process, prefetched in background threads.

    get_state() -> small JSON-able dict describing the batches consumed so far; set_state() on a fresh loader
    (same files, B, T, rank, world size) continues with exactly the next batch.
    """

    def __init__(self, tokenizer: Tokenizer, files: list[str], B: int, T: int, *, rank: int | None = None,
                 world_size: int | None = None, buffer_size: int = 1000, tokenizer_batch_size: int = 128,
                 tokenizer_threads: int = 4, prefetch: int = 2):
        if rank is None or world_size is None:
            import jax

            rank = jax.process_index() if rank is None else rank
            world_size = jax.process_count() if world_size is None else world_size
        dataset = BestFitDataset(tokenizer, files, B, T, rank, world_size, buffer_size, tokenizer_batch_size,
                                 tokenizer_threads)
        self.files, self.rank = files, rank
        self._shards: list | None = None
        self._it = _Prefetch(iter(dataset), prefetch)
        super().__init__(self._it)

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return next(self._it)

    def shards(self) -> list:
        """The files' dataset.shard_identities, read once (on first use: a validation loader never needs them)."""
        if self._shards is None:
            self._shards = shard_identities(self.files)
        return self._shards

    def get_state(self) -> dict:
        # The shard list is the same object every step (never modified), so only the small part is copied.
        return {**copy.deepcopy(self._it.get_state()), "shards": self.shards()}

    def set_state(self, state: dict, allow_data_change: bool = False) -> None:
        """Continue where `state` stopped; a UserError if its shards were removed or rewritten since, unless
        allow_data_change (then the position is found by file name: check_resume_shards)."""
        check_resume_shards(state, self.shards(), allow_data_change)
        self._it.set_state(_renumber(state, self.shards(), self.rank) if "shards" in state else state)

    @property
    def epoch(self) -> int:
        """Epoch of the most recently read chunk (starts at 1)."""
        return int(self._it.get_state()["epoch"])


# ----------------------------------------------------------------------------------------------------------------
# Feeding the step: the data source, one loader per data shard, global batches on the mesh


def prepare_data(data: str) -> tuple:
    """(tokenizer, {"train": files, "val": files}) of a data source; the demo corpus and its tokenizer are built on
    first use (by process 0, the others wait)."""
    tok_dir = toklib.default_dir(data)
    if data == "demo":
        dataset.build_demo_corpus()
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.pkl")) and jax.process_index() == 0:
            from jaxchat.data.tok_train import train_tokenizer
            train_tokenizer(source="demo", vocab_size=4096, max_chars=2_000_000_000, doc_cap=10_000, out_dir=tok_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("demo tokenizer ready")
    files = {split: dataset.list_shards(data, split) for split in ("train", "val")}
    dataset.check_shards(files["train"])  # footers: a bad file is one line naming it, before compiling
    dataset.check_shards(files["val"], full=True)  # every text: the final evaluation must not fail on it
    return Tokenizer.load(tok_dir), files


def saved_states(meta: dict) -> list[dict]:
    """The loader states a checkpoint's meta record holds, one per data shard in shard order (saved before data
    shards: its one state)."""
    return meta.get("dataloader_states") or [meta["dataloader_state_dict"]]


def check_resume_data(states: list[dict], data: str, allow_change: bool, where: str) -> None:
    """Before compiling: a checkpoint's loader states (saved_states) against the train shards present now (
    check_resume_shards: changed shards are one line, accepted ones print what the resume does)."""
    now = dataset.shard_identities(dataset.list_shards(data, "train"))
    note = check_resume_shards(states[0], now, allow_change, where)  # every shard's state lists the same files
    if note:
        print0(note)


def shard_layout(data_shards: int, device_batch_size: int) -> tuple[int, int, int]:
    """(data shards in all, shards of this process, this process's first shard) for --data-shards (0: one per
    process); each shard is one loader rank, like one of nanochat's DDP ranks."""
    shards = data_shards or jax.process_count()
    per_process = shards // jax.process_count()
    rows = device_batch_size * jax.local_device_count()
    if shards % jax.process_count() or rows % per_process:
        raise UserError(f"--data-shards={shards} must be a multiple of the {jax.process_count()} processes and split "
                        f"each process's {rows} rows evenly")
    return shards, per_process, jax.process_index() * per_process


def make_loaders(tok, files: list[str], *, device_batch_size: int, seq_len: int, data_shards: int) -> "ShardLoaders":
    """This process's loaders over `files` (fresh: a validation pass makes one per evaluation, from the start)."""
    shards, per_process, first = shard_layout(data_shards, device_batch_size)
    rows = device_batch_size * jax.local_device_count() // per_process
    return ShardLoaders([DataLoader(tok, files, rows, seq_len, rank=first + j, world_size=shards)
                         for j in range(per_process)])


class ShardLoaders:
    """This process's data shards (consecutive loader ranks), their rows concatenated into one local batch.

    With one shard per process this is the plain per-process loader. Fixing --data-shards makes the global batch
    independent of the number of processes: 1 process reading shards 0 and 1 sees the same rows, in the same
    order, as 2 processes reading one each (the multi-process test relies on it; so can a resume on fewer hosts).
    """

    def __init__(self, loaders: list):
        self.loaders = loaders

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [next(loader) for loader in self.loaders]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def get_state(self) -> list[dict]:
        return [loader.get_state() for loader in self.loaders]

    def set_state(self, states: list[dict], allow_data_change: bool = False) -> None:
        for loader, state in zip(self.loaders, states, strict=True):
            loader.set_state(state, allow_data_change)

    @property
    def epoch(self) -> int:
        return min(loader.epoch for loader in self.loaders)


def global_batch(local_ART: np.ndarray, sharding) -> jax.Array:
    """This process's rows -> one global array sharded over every device of every process."""
    return jax.make_array_from_process_local_data(sharding, local_ART)


def step_batch(loader, grad_accum: int, sharding) -> tuple[jax.Array, jax.Array]:
    """One step's (inputs, targets): `grad_accum` micro-batches from the loader stacked (A, rows, T), on the devices."""
    micro = [next(loader) for _ in range(grad_accum)]
    return tuple(global_batch(np.stack([m[i] for m in micro]).astype(np.int32), sharding) for i in (0, 1))
