"""Shards: demo corpus, validation of files, split rules and their errors, downloads from a local HTTP server."""

import http.server
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxchat.data import dataset
from jaxchat.runtime.common import UserError


@pytest.fixture(autouse=True)
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


def write_parquet(path, docs):
    pq.write_table(pa.table({"text": docs}), str(path), row_group_size=1024)


def test_demo_corpus_deterministic_and_readable(tmp_path):
    a = dataset.build_demo_corpus(str(tmp_path / "a"), max_chars=1_500_000)
    b = dataset.build_demo_corpus(str(tmp_path / "b"), max_chars=1_500_000)
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    names = sorted(n for n in os.listdir(a) if n.endswith(".parquet"))
    assert len(names) >= 2 and (tmp_path / "a" / dataset.VAL_RECORD).read_text() == names[-1] + "\n"
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        pf = pq.ParquetFile(os.path.join(a, name))
        assert pf.schema_arrow.names == ["text"]
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        assert all(n == 1024 for n in sizes[:-1]) and 0 < sizes[-1] <= 1024
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert dataset.list_shards(a, "val") == [os.path.join(a, names[-1])]
    assert dataset.list_shards(a, "train") == [os.path.join(a, n) for n in names[:-1]]
    texts = pq.read_table(os.path.join(a, names[0])).column("text").to_pylist()
    assert any("def " in t for t in texts) and len(set(texts)) > 0.9 * len(texts)
    mtime = os.path.getmtime(os.path.join(a, names[0]))
    assert dataset.build_demo_corpus(a, max_chars=1_500_000) == a  # idempotent: nothing rebuilt
    assert os.path.getmtime(os.path.join(a, names[0])) == mtime


def test_demo_rebuild_keeps_files_it_did_not_write(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "shard_00000.parquet").write_bytes(b"PAR1 cut short")  # a broken earlier build: rebuilt
    dataset.build_demo_corpus(str(out), max_chars=300_000)
    assert (out / "notes.txt").read_text() == "my notes"
    assert len(dataset.list_shards(str(out), "train")) >= 1 and dataset._complete(str(out))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_offline_download_suggests_the_same_command(base, monkeypatch):
    # A closed local port stands in for an unreachable host (tests never touch the network).
    monkeypatch.setitem(dataset.SOURCES, "fineweb-edu", dict(dataset.SOURCES["fineweb-edu"], url="http://127.0.0.1:9"))
    monkeypatch.setattr(dataset, "BACKOFF_S", 0.0)
    monkeypatch.setattr(dataset, "ATTEMPTS", 1)
    with pytest.raises(UserError) as e:
        dataset.download(1, "fineweb-edu", workers=2)
    assert "re-run `python -m jaxchat.dataset -n 1`" in str(e.value) and "-n 8" not in str(e.value)


def test_check_shard_detects_broken_files(tmp_path):
    good = tmp_path / "good.parquet"
    write_parquet(good, ["a doc", "another doc"] * 100)
    dataset.check_shard(str(good))
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable parquet"):
        dataset.check_shard(str(cut))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["x"]}), str(other))
    with pytest.raises(ValueError, match="no string column 'text'"):
        dataset.check_shard(str(other))


def test_shard_identity_names_the_content_from_the_footer(tmp_path):
    """What a loader state records of each shard: the same file copied elsewhere is the same shard; other documents
    under the same name are not; a file cut short is one line naming it."""
    first, copy = tmp_path / "shard_00000.parquet", tmp_path / "copy" / "shard_00000.parquet"
    write_parquet(first, ["a doc", "another doc"] * 100)
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    name, size, digest = dataset.shard_identity(str(first))
    assert (name, size) == ("shard_00000.parquet", first.stat().st_size) and len(digest) == 16
    assert dataset.shard_identity(str(copy)) == [name, size, digest]
    write_parquet(copy, ["a doc", "other doc"] * 100)
    assert dataset.shard_identity(str(copy))[2] != digest
    copy.write_bytes(first.read_bytes()[:100])
    with pytest.raises(UserError, match=f"cannot read shard {copy} .*delete it and re-run"):
        dataset.shard_identity(str(copy))


def test_negative_shard_count_other_than_all_is_one_line(base):
    """nanochat's -1 means all shards; -5 meant all 1,823 (~180 GB) too."""
    with pytest.raises(UserError) as e:
        dataset.main(["-n", "-5"])
    assert str(e.value) == ("-n/--num-files=-5 is not a number of shards: give 0 or more (train shards 0..n-1; the "
                            "validation shard always comes too), or -1 for all 1823 shards of fineweb-edu")
    assert not (base / "base_data").exists()  # refused before anything was fetched or created
    with pytest.raises(UserError, match=r"^-n/--num-files=999999 is more than the 1822 train shards of fineweb-edu: "
                                        r"give at most 1822, or -1 for all 1823 shards knowingly$"):
        dataset.main(["-n", "999999"])  # capped silently, nanochat's way: all ~180 GB
    assert not (base / "base_data").exists()


def test_missing_data_names_the_command(base):
    with pytest.raises(UserError, match=r"python -m jaxchat.dataset -n 8`"):
        dataset.list_shards("fineweb-edu", "train")
    with pytest.raises(UserError, match=r"--source climbmix"):
        dataset.list_shards("climbmix", "val")
    with pytest.raises(UserError, match=r"python -m jaxchat.dataset --demo"):
        dataset.list_shards("demo", "train")
    d = base / "base_data"
    d.mkdir(parents=True)
    for i in (0, 1):
        write_parquet(d / dataset.shard_name(i), ["x"])
    with pytest.raises(UserError, match="validation shard shard_01822.parquet missing"):
        dataset.list_shards("fineweb-edu", "val")
    write_parquet(d / dataset.shard_name(1822), ["v"])
    (d / "shard_00002.parquet.123.tmp").write_bytes(b"partial")
    assert dataset.list_shards("fineweb-edu", "val") == [str(d / "shard_01822.parquet")]
    assert dataset.list_shards("fineweb-edu", "train") == [str(d / dataset.shard_name(i)) for i in (0, 1)]


class _FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the test directory, failing the first request of every file (to exercise the retry)."""

    seen: dict = {}

    def do_GET(self):
        count = self.seen.get(self.path, 0)
        self.seen[self.path] = count + 1
        if count == 0:
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "remote"
    root.mkdir()
    _FlakyHandler.seen = {}
    handler = lambda *a, **kw: _FlakyHandler(*a, directory=str(root), **kw)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setitem(dataset.SOURCES, "fineweb-edu",
                        dict(dataset.SOURCES["fineweb-edu"], url=f"http://127.0.0.1:{httpd.server_port}"))
    monkeypatch.setattr(dataset, "BACKOFF_S", 0.01)
    monkeypatch.setattr(dataset, "TIMEOUT_S", 5.0)
    yield root
    httpd.shutdown()
    httpd.server_close()


def test_download_retries_validates_and_skips(server, base):
    for i in (0, 1, 1822):
        write_parquet(server / dataset.shard_name(i), [f"document {i}.{j}" for j in range(10)])
    out = dataset.download(2, "fineweb-edu", workers=2)
    assert out == str(base / "base_data")
    assert sorted(os.listdir(out)) == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    for name in os.listdir(out):
        assert (server / name).read_bytes() == (base / "base_data" / name).read_bytes()
    assert _FlakyHandler.seen == {"/shard_00000.parquet": 2, "/shard_00001.parquet": 2, "/shard_01822.parquet": 2}

    # a broken local file is fetched again; complete ones are not requested at all
    (base / "base_data" / "shard_00001.parquet").write_bytes(b"PAR1 truncated")
    _FlakyHandler.seen = {}
    dataset.download(2, "fineweb-edu", workers=2)
    assert _FlakyHandler.seen == {"/shard_00001.parquet": 2}
    dataset.check_shard(str(base / "base_data" / "shard_00001.parquet"))

    # a file that is not parquet on the server fails every attempt and leaves no temp file behind
    (server / "shard_00002.parquet").write_bytes(b"<html>not parquet</html>")
    with pytest.raises(RuntimeError, match="after 2 attempts"):
        dataset.download_shard(2, "fineweb-edu", out, attempts=2)
    assert sorted(os.listdir(out)) == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    with pytest.raises(UserError, match="re-run"):
        dataset.download(4, "fineweb-edu", workers=1)  # shard 3 does not exist there (404)


def test_demo_and_bare_directories_record_their_validation_shard_by_name(tmp_path):
    """The validation shard of the demo corpus (and of a bare directory) was "the file that sorts last": a shard
    copied in as shard_00003 became validation, the old validation shard was trained on, and removing it was refused
    naming the wrong file. Now the directory records it by name (dataset.VAL_RECORD) and the split follows the name."""
    import shutil

    demo = tmp_path / "demo"
    dataset.build_demo_corpus(str(demo), max_chars=300_000)
    names = sorted(n for n in os.listdir(demo) if n.endswith(".parquet"))
    val = names[-1]
    added = str(shutil.copy(demo / names[0], demo / "shard_00009.parquet"))
    assert dataset.list_shards(str(demo), "val") == [str(demo / val)]
    assert dataset.list_shards(str(demo), "train") == [str(demo / n) for n in names[:-1]] + [added]
    (demo / val).unlink()
    with pytest.raises(UserError, match=rf"^validation shard {val} \(named in {demo / dataset.VAL_RECORD}\) is "
                                        rf"missing from {demo}: put it back"):
        dataset.list_shards(str(demo), "train")

    bare = tmp_path / "bare"  # shards copied in by hand, no record: nanochat's choice, recorded at first listing
    bare.mkdir()
    for i in range(2):
        write_parquet(bare / f"part_{i}.parquet", [f"document {i}"])
    assert dataset.list_shards(str(bare), "val") == [str(bare / "part_1.parquet")]
    assert (bare / dataset.VAL_RECORD).read_text() == "part_1.parquet\n"
    write_parquet(bare / "part_2.parquet", ["a later shard"])
    assert dataset.list_shards(str(bare), "val") == [str(bare / "part_1.parquet")]
    assert dataset.list_shards(str(bare), "train") == [str(bare / "part_0.parquet"), str(bare / "part_2.parquet")]


SLOW_SERVER = """
import http.server, sys, threading, time
from jaxchat.data import dataset
from jaxchat.runtime import cli

class Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # 64 MB at 2 MB/s: a shard takes half a minute
        self.send_response(200)
        self.send_header("Content-Length", str(64 << 20))
        self.end_headers()
        for _ in range(128):
            self.wfile.write(b"x" * (1 << 19))
            time.sleep(0.25)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the client hung up: expected here
        pass

httpd = Server(("127.0.0.1", 0), Slow)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
dataset.SOURCES["fineweb-edu"]["url"] = f"http://127.0.0.1:{httpd.server_port}"
cli.run(dataset.main, ["-n", "6", "-w", "2"])
"""


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_during_downloads_stops_them_and_leaves_no_temporary_file(tmp_path, signals):
    """SIGTERM (or Ctrl-C) during `dataset -n N`: leaving the worker pool waited for every queued shard (with -1, all
    ~180 GB), and the shards being fetched left their .tmp files. Now queued shards are dropped, running ones stop
    at their next chunk and remove their .tmp, and the command exits with one line and 143. A second signal 20 ms
    later (an impatient user, a scheduler repeating itself) cut that clean-up short and left the .tmp files."""
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, JAXCHAT_BASE_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    data = tmp_path / "base_data"
    try:
        deadline = time.monotonic() + 60
        while not (data.is_dir() and any(p.name.endswith(".tmp") for p in data.iterdir())):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        t0 = time.monotonic()
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.02)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143 and err.splitlines()[-1] == "interrupted by SIGTERM: exiting", err[-2000:]
    assert "Traceback" not in err and time.monotonic() - t0 < 15  # not after the 6 shards' 3 minutes
    assert not list(data.iterdir()), sorted(data.iterdir())
