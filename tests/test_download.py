"""The shared download helpers: fetch to a temporary file and rename; build a directory beside its target and rename."""

import http.server
import os
import threading

import pytest

from jaxchat.data.download import build_directory, fetch


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A directory served on 127.0.0.1 (never the network); yields (root, base URL)."""
    root = tmp_path / "remote"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            lambda *a, **kw: _QuietHandler(*a, directory=str(root), **kw))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_streams_then_renames(served, tmp_path):
    root, url = served
    payload = os.urandom(3 << 20)  # several read chunks
    (root / "blob").write_bytes(payload)
    out = tmp_path / "local" / "blob"
    out.parent.mkdir()
    checked = []
    assert fetch(f"{url}/blob", str(out), check=lambda tmp: checked.append(tmp.endswith(".tmp"))) == str(out)
    assert out.read_bytes() == payload and checked == [True]  # checked under its temporary name, before the rename
    assert os.listdir(out.parent) == ["blob"]


def test_fetch_failures_leave_nothing(served, tmp_path):
    root, url = served
    (root / "blob").write_bytes(b"not what we want")
    out = tmp_path / "blob"
    with pytest.raises(OSError):  # HTTP 404
        fetch(f"{url}/missing", str(out))

    def refuse(path):
        raise ValueError(f"{path}: bad content")

    with pytest.raises(ValueError, match="bad content"):
        fetch(f"{url}/blob", str(out), check=refuse)
    with pytest.raises(OSError):
        fetch((tmp_path / "nowhere").as_uri(), str(out))
    assert os.listdir(tmp_path) == ["remote"]  # neither the file nor a temporary one


def test_a_fetch_without_a_bar_never_waits_on_tqdm(tmp_path):
    """dataset's worker threads fetch with no bar. A disabled tqdm still took tqdm's global lock, which a SIGTERM
    raised while the main thread built its own bar left held: the workers waited for ever, and so did the exit."""
    from tqdm import tqdm

    src = tmp_path / "src"
    src.write_bytes(b"shard")
    tqdm.get_lock()  # built before it is held, as the main thread's bar builds it
    lock = tqdm.get_lock().locks[-1]  # the threading lock; held here by another thread
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    held.wait(5)
    result = []
    worker = threading.Thread(target=lambda: result.append(fetch(src.as_uri(), str(tmp_path / "out"))), daemon=True)
    worker.start()
    worker.join(10)
    release.set()
    assert result == [str(tmp_path / "out")] and (tmp_path / "out").read_bytes() == b"shard"


def test_fetch_replaces_an_existing_file(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.write_bytes(b"new")
    out.write_bytes(b"old")
    fetch(src.as_uri(), str(out))
    assert out.read_bytes() == b"new"


def _complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, "done"))


def _write(name: str, content: str):
    def build(tmp):
        os.makedirs(os.path.join(tmp, name))
        for f in ("part", "done"):
            with open(os.path.join(tmp, name, f), "w") as fh:
                fh.write(content)
        return os.path.join(tmp, name)
    return build


def test_build_directory_renames_into_place(tmp_path):
    dest = tmp_path / "out"
    seen = []

    def build(tmp):
        seen.append(os.path.dirname(tmp) == str(tmp_path) and not dest.exists())  # built beside dest, dest absent
        (tmp_path / os.path.basename(tmp) / "done").write_text("1")

    assert build_directory(str(dest), build, _complete) == str(dest)
    assert seen == [True] and os.listdir(dest) == ["done"] and os.listdir(tmp_path) == ["out"]
    # a subdirectory of the build (an archive's top folder) can be what is installed
    assert build_directory(str(tmp_path / "sub"), _write("top", "x"), _complete) == str(tmp_path / "sub")
    assert sorted(os.listdir(tmp_path / "sub")) == ["done", "part"]


def test_build_directory_keeps_a_complete_one_and_replaces_a_broken_one(tmp_path):
    dest = tmp_path / "out"
    build_directory(str(dest), _write("a", "first"), _complete)
    build_directory(str(dest), _write("a", "second"), _complete)  # another process finished first: its build stays
    assert (dest / "part").read_text() == "first"
    (dest / "done").unlink()  # an interrupted earlier build
    build_directory(str(dest), _write("a", "third"), _complete)
    assert (dest / "part").read_text() == "third" and sorted(os.listdir(tmp_path)) == ["out"]


def test_build_directory_failure_leaves_nothing(tmp_path):
    def fail(tmp):
        open(os.path.join(tmp, "half"), "w").close()
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        build_directory(str(tmp_path / "out"), fail, _complete)
    assert os.listdir(tmp_path) == []


def test_build_directory_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        build_directory(str(tmp_path / "out"), lambda tmp: None, _complete)
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # readable by the other users of a shared disk
