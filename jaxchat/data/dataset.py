"""Pretraining shards: download (FineWeb-EDU / ClimbMix), list train/val files, read them, build the demo corpus.

    python -m jaxchat.dataset -n 370                 # FineWeb-EDU shards 0..369 plus the pinned val shard 01822
    python -m jaxchat.dataset -n 170 --source climbmix
    python -m jaxchat.dataset --demo                 # small corpus from the Python stdlib's docstrings and sources
"""

import argparse
import ast
import contextlib
import hashlib
import os
import random
import sys
import sysconfig
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq

from jaxchat.data.download import Stopped, build_directory, fetch
from jaxchat.runtime.common import JAXCHAT_ONLY, UserError, base_dir, cli_parser, replacing

# nanochat/dataset.py BASE_URL and MAX_SHARD. The last shard of each source is its validation shard; pinning it
# (instead of nanochat's "whichever file sorts last locally", list_parquet_files) keeps the split independent of how
# many shards were downloaded.
SOURCES = {
    "fineweb-edu": dict(url="https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
                        subdir="base_data", max_index=1822),
    "climbmix": dict(url="https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
                     subdir="base_data_climbmix", max_index=6542),
}
DEMO_SUBDIR = "base_data_demo"
# In the demo corpus or a bare directory of shards: the name of its validation shard. Without it the split was
# nanochat's "the file that sorts last" (nanochat/dataset.py list_parquet_files at 348fbb3), so adding a shard moved
# validation to it and trained on the old validation documents.
VAL_RECORD = "val_shard.txt"
ROW_GROUP_SIZE = 1024  # nanochat's dev/repackage_data_reference.py row_group_size
ATTEMPTS = 5
BACKOFF_S = 1.0  # wait BACKOFF_S * 2**attempt after a failed attempt (nanochat/dataset.py download_single_file)
TIMEOUT_S = 60.0


def shard_name(index: int) -> str:
    """File name of shard `index` (nanochat/dataset.py index_to_filename)."""
    return f"shard_{index:05d}.parquet"


def val_shard_name(source: str) -> str:
    """The pinned validation shard of a download source."""
    return shard_name(SOURCES[source]["max_index"])


def data_dir(source: str) -> str:
    """Local directory of a source's shards: fineweb-edu, climbmix or demo."""
    if source == "demo":
        return os.path.join(base_dir(), DEMO_SUBDIR)
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}: choose fineweb-edu, climbmix or demo")
    return os.path.join(base_dir(), SOURCES[source]["subdir"])


def download_command(source: str) -> str:
    """The command that fetches a source's data."""
    if source == "demo":
        return "python -m jaxchat.dataset --demo"
    return "python -m jaxchat.dataset -n 8" + ("" if source == "fineweb-edu" else f" --source {source}")


def _parquet_files(directory: str) -> list[str]:
    # `.tmp` files are unfinished downloads; sorted like nanochat/dataset.py list_parquet_files.
    if not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory) if f.endswith(".parquet"))


def list_shards(source_or_dir: str, split: str) -> list[str]:
    """Paths of the train or val shards of a source (fineweb-edu, climbmix, demo) or of a directory of shards."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, not {split!r}")
    is_source = source_or_dir in SOURCES or source_or_dir == "demo"
    directory = data_dir(source_or_dir) if is_source else source_or_dir
    files = _parquet_files(directory)
    hint = f": run `{download_command(source_or_dir)}`" if is_source else ""
    if not files:
        raise UserError(f"no parquet shards in {directory}{hint}")
    if source_or_dir in SOURCES:
        val = val_shard_name(source_or_dir)
        if val not in files:
            raise UserError(f"validation shard {val} missing from {directory}{hint}")
        chosen = [val] if split == "val" else [f for f in files if f != val]
    else:  # demo corpus or a bare directory: the shard its VAL_RECORD names
        val = recorded_val_shard(directory, files)
        chosen = [val] if split == "val" else [f for f in files if f != val]
    if not chosen:
        raise UserError(f"no {split} shards in {directory} (found only {files}){hint}")
    return [os.path.join(directory, f) for f in chosen]


def recorded_val_shard(directory: str, files: list[str]) -> str:
    """The validation shard of a demo or bare shard directory: the one its VAL_RECORD names. A directory without the
    record (an older demo corpus, shards copied in by hand) gets one naming nanochat's choice, the file that sorts
    last, the first time it is listed, so shards added later are training shards; a read-only directory keeps
    nanochat's rule. A recorded shard that is gone is one line naming it."""
    record = os.path.join(directory, VAL_RECORD)
    try:
        with open(record, encoding="utf-8") as f:
            val = f.read().strip()
    except FileNotFoundError:
        val = files[-1]
        # concurrent first listings (one per process) write the same name; the rename is atomic
        with contextlib.suppress(OSError), replacing(record, unique=True) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(val + "\n")
    except OSError as e:
        raise UserError(f"cannot read {record} ({e.strerror}), which names the validation shard of {directory}: "
                        f"check its permissions") from None
    if val not in files:
        raise UserError(f"validation shard {val} (named in {record}) is missing from {directory}: put it back, or "
                        f"name another shard of {directory} in {record} (a resume then evaluates on other "
                        f"documents)")
    return val


def check_shard(path: str) -> None:
    """Raise ValueError unless `path` is a readable parquet file with a string `text` column."""
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as e:  # pyarrow raises several types for truncated or non-parquet files
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    if "text" not in schema.names or not pa.types.is_string(schema.field("text").type):
        raise ValueError(f"{path}: no string column 'text' (columns {schema.names})")


def _shard_ok(path: str) -> bool:
    try:
        check_shard(path)
        return True
    except ValueError:
        return False


def open_shard(path: str) -> pq.ParquetFile:
    """A shard's parquet file; an unreadable one is a UserError naming the file and the fix."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise _unreadable(path, e) from None


def read_texts(path: str, rg_idx: int) -> list[str]:
    """The `text` column of one row group (nanochat/dataset.py parquets_iter_batched reads shards this way); a
    column of another type or with invalid UTF-8 is a UserError naming the file."""
    try:
        column = open_shard(path).read_row_group(rg_idx, columns=["text"]).column("text")
        if not _is_text(column.type):
            raise TypeError(f"column 'text' holds {column.type}, not strings")
        return column.to_pylist()
    except (OSError, pa.ArrowException, KeyError, TypeError, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from None


_IDENTITIES: dict[tuple[str, int, int], tuple[str, int, str]] = {}  # (path, size, mtime) -> shard_identity


def shard_identity(path: str) -> list:
    """[file name, size in bytes, hash of the parquet footer]: what a data-loader state records of each shard.

    The footer lists every row group's offsets, byte sizes and row counts, so a file with other documents has another
    footer; reading it is one seek and a few KB per file (about a second for 1,823 shards of 100 MB), never the data.
    Cached per (path, size, modification time) for the process."""
    try:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in _IDENTITIES:
            with open(path, "rb") as f:
                f.seek(-8, os.SEEK_END)  # parquet ends with the footer's length (4 bytes, little-endian) and PAR1
                tail = f.read(8)
                length = int.from_bytes(tail[:4], "little")
                if tail[4:] != b"PAR1" or length + 8 > st.st_size:
                    raise ValueError("no parquet footer at the end of the file")
                f.seek(-8 - length, os.SEEK_END)
                footer = f.read(length)
            _IDENTITIES[key] = (os.path.basename(path), st.st_size, hashlib.blake2b(footer, digest_size=8).hexdigest())
        return list(_IDENTITIES[key])
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def shard_identities(files: list[str]) -> list[list]:
    """shard_identity of each file, in order."""
    return [shard_identity(f) for f in files]


def check_shards(files: list[str], min_documents: int = 1, full: bool = False) -> int:
    """Every shard readable with a string `text` column; the total document count. full=False reads the parquet
    footers only (fast, for hundreds of train shards); full=True also reads every text and checks its UTF-8.

    A training run calls it at start-up: a bad file is one line naming it before compiling, not hours into the run."""
    total = 0
    for path in files:
        pf = open_shard(path)
        schema = pf.schema_arrow
        if "text" not in schema.names or not _is_text(schema.field("text").type):
            kind = schema.field("text").type if "text" in schema.names else f"no 'text' column ({schema.names})"
            raise _unreadable(path, TypeError(f"column 'text' holds {kind}, not strings"))
        for g in range(pf.num_row_groups) if full else ():
            try:
                pf.read_row_group(g, columns=["text"]).column("text").validate(full=True)
            except (OSError, pa.ArrowException) as e:
                raise _unreadable(path, e) from None
        total += pf.metadata.num_rows
    if total < min_documents:
        raise UserError(f"{len(files)} shard(s) starting {files[0]} hold {total} document(s), at least "
                        f"{min_documents} needed: delete them and re-run the command that fetched them")
    return total


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _unreadable(path: str, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [""])[0]
    gone = not os.path.exists(path)  # removed meanwhile: nothing to delete, only to fetch again
    return UserError(f"cannot read shard {path} ({type(e).__name__}: {first[:100]}); {'' if gone else 'delete it and '}"
                     f"re-run the command that fetched it (python -m jaxchat.dataset ...)")


def download_shard(index: int, source: str, out_dir: str, attempts: int = ATTEMPTS,
                   stop: threading.Event | None = None) -> str:
    """Fetch one shard into out_dir (temp file + atomic rename), retrying with exponential backoff; returns its path.
    `stop` set (the command is exiting) ends it at once (download.Stopped)."""
    path = os.path.join(out_dir, shard_name(index))
    if os.path.exists(path) and _shard_ok(path):
        return path
    url = f"{SOURCES[source]['url']}/{shard_name(index)}"
    stop = stop or threading.Event()
    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        if stop.is_set():
            raise Stopped(url)
        try:
            return fetch(url, path, timeout=TIMEOUT_S, check=check_shard, stop=stop)
        except Stopped:
            raise
        except Exception as e:  # network errors, HTTP errors and broken files are all retried
            last_error = e
            if attempt < attempts:
                stop.wait(BACKOFF_S * 2 ** attempt)
    raise RuntimeError(f"could not download {url} after {attempts} attempts: {last_error}")


def download(n: int, source: str = "fineweb-edu", workers: int = 4) -> str:
    """Download shards 0..n-1 (n = -1: all) plus the pinned val shard, in parallel; returns the data dir."""
    from tqdm import tqdm

    max_index = SOURCES[source]["max_index"]
    if n < -1:  # nanochat/dataset.py takes -1 for all; other negatives would mean all too, silently
        raise UserError(f"-n/--num-files={n} is not a number of shards: give 0 or more (train shards 0..n-1; the "
                        f"validation shard always comes too), or -1 for all {max_index + 1} shards of {source}")
    if n > max_index:  # nanochat caps it (min(n, MAX_SHARD + 1)): a typo would silently fetch all ~180 GB
        raise UserError(f"-n/--num-files={n} is more than the {max_index} train shards of {source}: give at most "
                        f"{max_index}, or -1 for all {max_index + 1} shards knowingly")
    count = max_index + 1 if n == -1 else n
    indices = sorted(set(range(count)) | {max_index})
    out_dir = data_dir(source)
    os.makedirs(out_dir, exist_ok=True)
    failed, stop = [], threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:  # submitting too: a signal there (a worker already fetching) would leave through a waiting shutdown
        futures = {pool.submit(download_shard, i, source, out_dir, stop=stop): i for i in indices}
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"{source} shards", unit="shard"):
            try:
                future.result()
            except RuntimeError as e:
                failed.append(futures[future])
                print(e, file=sys.stderr, flush=True)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM): a `with` pool waited for every queued shard (all ~180 GB of -1); queued
        # ones are dropped and running ones stop at their next chunk, removing their .tmp files
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)  # cli.run ignores a second signal meanwhile
        raise
    pool.shutdown()
    if failed:
        again = f"python -m jaxchat.dataset -n {n}" + ("" if source == "fineweb-edu" else f" --source {source}")
        raise UserError(f"{len(failed)} of {len(indices)} shards failed ({sorted(failed)[:10]}...; is the network "
                        f"reachable?); re-run `{again}` to fetch only the missing ones")
    print(f"{len(indices)} shards in {out_dir}", flush=True)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Demo corpus: text present on every machine with Python, so training runs end to end offline.

DEMO_MAX_CHARS = 8_000_000
DEMO_SEED = 42
DEMO_VAL_FRACTION = 0.1
DEMO_ROW_GROUPS_PER_SHARD = 4
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip", "turtledemo",
              "__pycache__"}


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return paths


def _documents(source: str, module: str) -> list[str]:
    """One document per docstring (module, class, function) and per top-level block of the source."""
    tree = ast.parse(source)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text and len(text) >= 40:
                title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                docs.append(f"{title}\n\n{text}")
    # Source split at top-level statements (decorators included); short runs of imports/assignments merge forward.
    lines = source.splitlines(keepends=True)
    starts = [min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) - 1 for n in tree.body]
    bounds = sorted(set([0] + starts)) + [len(lines)]
    block = ""
    for a, b in zip(bounds, bounds[1:]):
        block += "".join(lines[a:b])
        if len(block) >= 256:
            docs.append(block)
            block = ""
    if block.strip():
        docs.append(block)
    return docs


def _write_shard(path: str, docs: list[str]) -> None:
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    # nanochat's dev/repackage_data_reference.py format: zstd level 3, no dictionary, no statistics, 1024 documents
    # per row group.
    pq.write_table(table, path, row_group_size=ROW_GROUP_SIZE, compression="zstd", compression_level=3,
                   use_dictionary=False, write_statistics=False)


def build_demo_corpus(out_dir: str | None = None, max_chars: int = DEMO_MAX_CHARS) -> str:
    """Build the stdlib demo corpus (train shards, then the val shard last) unless present; returns its dir."""
    out_dir = out_dir or data_dir("demo")
    if _complete(out_dir):
        return out_dir
    files = _stdlib_files()
    random.Random(0).shuffle(files)  # a size cap then samples the whole stdlib, not its first letters
    root = sysconfig.get_paths()["stdlib"]
    docs, total = [], 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            new = _documents(source, os.path.relpath(path, root)[:-3].replace(os.sep, "."))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately invalid or not UTF-8
        docs += new
        total += sum(map(len, new))
        if total >= max_chars:
            break
    random.Random(DEMO_SEED).shuffle(docs)
    # At least two row groups of val when the corpus allows, so two processes can both evaluate.
    n_val = max(int(len(docs) * DEMO_VAL_FRACTION), min(2 * ROW_GROUP_SIZE, len(docs) // 4))
    if n_val < 1:
        raise UserError(f"only {len(docs)} demo documents from the Python stdlib: raise max_chars ({max_chars})")
    train, val = docs[:-n_val], docs[-n_val:]
    per_shard = DEMO_ROW_GROUPS_PER_SHARD * ROW_GROUP_SIZE
    shards = [train[i:i + per_shard] for i in range(0, len(train), per_shard)] + [val]

    def write(tmp: str) -> None:
        for i, shard in enumerate(shards):
            _write_shard(os.path.join(tmp, shard_name(i)), shard)
        with open(os.path.join(tmp, VAL_RECORD), "w", encoding="utf-8") as f:
            f.write(shard_name(len(shards) - 1) + "\n")  # the val shard, by name: a shard added later trains

    # Concurrent builders (one per process) never see a half-written corpus, and the first to finish wins.
    return build_directory(out_dir, write, _complete,
                           owned=lambda name: name.startswith("shard_") or name == VAL_RECORD)


def _complete(directory: str) -> bool:
    files = _parquet_files(directory)
    return len(files) >= 2 and all(_shard_ok(os.path.join(directory, f)) for f in files)


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m jaxchat.dataset` (nanochat/dataset.py's flags, plus jaxchat's)."""
    p = cli_parser(__doc__)
    p.add_argument("-n", "--num-files", type=int, default=-1,
                   help="number of train shards to download, 0..n-1 (-1: all); the validation shard always")
    p.add_argument("-w", "--num-workers", type=int, default=4, help="number of parallel download workers")
    p.add_argument("--source", default="fineweb-edu", choices=sorted(SOURCES),
                   help=JAXCHAT_ONLY + "which corpus to download")
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=False,
                   help=JAXCHAT_ONLY + "build the offline demo corpus from the Python stdlib instead (no network)")
    return p


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    if args.demo:
        out = build_demo_corpus()
        sizes = {f: pq.ParquetFile(os.path.join(out, f)).metadata.num_rows for f in _parquet_files(out)}
        val = recorded_val_shard(out, _parquet_files(out))
        print(f"demo corpus in {out}: {sizes} documents (validation: {val}, named in {VAL_RECORD})", flush=True)
    else:
        download(args.num_files, args.source, args.num_workers)
