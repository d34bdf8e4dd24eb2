"""The CORE eval bundle: download (from file:// or a local HTTP server, never the network), lock, locate, CLI."""

import fcntl
import http.server
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import shared_fixture

from jaxchat.eval import core_bundle, core_eval
from jaxchat.runtime.common import UserError


def fixture_bundle() -> Path:
    return shared_fixture("core_small/eval_bundle")


def make_bundle(root: Path) -> Path:
    """A minimal bundle of one task."""
    (root / "eval_data").mkdir(parents=True)
    (root / "core.yaml").write_text("icl_tasks:\n- label: t\n  icl_task_type: language_modeling\n"
                                    "  dataset_uri: t.jsonl\n  num_fewshot: [0]\n")
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nt,0\n")
    (root / "eval_data" / "t.jsonl").write_text('{"context": "a", "continuation": "b"}\n')
    return root


def zip_dir(src: Path, archive: Path, top: str = "eval_bundle") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:  # the real archive holds a top-level eval_bundle/ folder
        for path in src.rglob("*"):
            zf.write(path, Path(top) / path.relative_to(src))
    return archive


def test_download_extracts_atomically_once(tmp_path):
    src = fixture_bundle()
    archive = zip_dir(src, tmp_path / "src.zip")
    dest = tmp_path / "base" / "eval_bundle"
    assert core_bundle.download_bundle(archive.as_uri(), str(dest)) == str(dest)
    assert [t.label for t in core_eval.load_tasks(str(dest))] == [t.label for t in core_eval.load_tasks(str(src))]
    assert not [p for p in (tmp_path / "base").iterdir() if p.name.startswith(".eval_bundle.") and p.is_dir()]
    archive.unlink()  # already there: no second download
    assert core_bundle.download_bundle(archive.as_uri(), str(dest)) == str(dest)


def test_download_failure_names_the_command(tmp_path):
    with pytest.raises(UserError, match="python -m jaxchat.core_eval --download") as e:
        core_bundle.download_bundle((tmp_path / "missing.zip").as_uri(), str(tmp_path / "eval_bundle"))
    assert not (tmp_path / "eval_bundle").exists()
    assert "--bundle" not in str(e.value)  # core_eval has no such flag: the message names only real ones
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no partial download left behind


def test_missing_bundle_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="python -m jaxchat.core_eval --download"):
        core_bundle.find_bundle(None, download=False)
    with pytest.raises(UserError, match="not a CORE eval bundle"):
        core_bundle.find_bundle(str(tmp_path / "nowhere"))


def test_locate_prefers_the_given_path_then_the_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "base"))
    given = make_bundle(tmp_path / "mine")
    assert core_bundle.find_bundle(str(given)) == str(given)
    default = make_bundle(tmp_path / "base" / "eval_bundle")
    assert core_bundle.find_bundle(None, download=False) == str(default) == core_bundle.default_bundle_dir()
    assert core_bundle.bundle_root(str(tmp_path)) == str(given)  # one level down: an archive's top folder
    assert core_bundle.bundle_root(str(tmp_path / "mine")) == str(given)
    assert core_bundle.bundle_root(str(tmp_path / "mine" / "eval_data")) is None
    assert core_bundle.bundle_root(str(tmp_path / "base")) == str(default)


def test_truncated_zip_is_removed_and_named(tmp_path):
    archive = zip_dir(make_bundle(tmp_path / "src"), tmp_path / "src.zip")
    dest = tmp_path / "base" / "eval_bundle"
    dest.parent.mkdir()
    (dest.parent / "eval_bundle.zip").write_bytes(archive.read_bytes()[:100])  # an earlier download cut short
    with pytest.raises(UserError, match="not a valid zip file"):
        core_bundle.download_bundle(archive.as_uri(), str(dest))
    assert not (dest.parent / "eval_bundle.zip").exists() and not dest.exists()
    assert core_bundle.download_bundle(archive.as_uri(), str(dest)) == str(dest)  # the next attempt fetches it again
    assert core_bundle.is_bundle(str(dest))


def test_archive_without_a_bundle_is_refused(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("not a bundle")
    archive = zip_dir(tmp_path / "junk", tmp_path / "junk.zip")
    with pytest.raises(UserError, match="does not contain core.yaml"):
        core_bundle.download_bundle(archive.as_uri(), str(tmp_path / "base" / "eval_bundle"))
    assert not (tmp_path / "base" / "eval_bundle").exists()


def test_a_second_downloader_waits_for_the_lock(tmp_path):
    """While one process holds the lock, another waits, then finds the finished bundle and downloads nothing."""
    archive = zip_dir(make_bundle(tmp_path / "src"), tmp_path / "src.zip")
    dest = tmp_path / "base" / "eval_bundle"
    dest.parent.mkdir()
    done = []
    with open(core_bundle.lock_path(str(dest)), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: done.append(core_bundle.download_bundle("file:///nowhere.zip",
                                                                                          str(dest))))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not dest.exists()  # blocked on the lock, has not tried the (bad) URL
        with zipfile.ZipFile(archive) as zf:  # the lock holder finishes the bundle
            zf.extractall(tmp_path / "unzipped")
        (tmp_path / "unzipped" / "eval_bundle").rename(dest)
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(timeout=30)
    assert done == [str(dest)]


@pytest.fixture
def http_root(tmp_path):
    """A directory served on 127.0.0.1 (a local server: never the network); yields (root, base URL)."""
    root = tmp_path / "remote"
    root.mkdir()
    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(root), **kw)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_over_http_and_the_command_line(http_root, tmp_path, capsys):
    root, url = http_root
    zip_dir(make_bundle(tmp_path / "src"), root / "eval_bundle.zip")
    dest = tmp_path / "base" / "eval_bundle"
    core_bundle.main(["--download", "--url", f"{url}/eval_bundle.zip", "--dest", str(dest)])
    assert f"CORE eval bundle ready at {dest}: 1 tasks" in capsys.readouterr().out
    assert (dest / "eval_data" / "t.jsonl").read_bytes() == (tmp_path / "src" / "eval_data" / "t.jsonl").read_bytes()
    with pytest.raises(UserError, match="cannot download the CORE eval bundle"):
        core_bundle.download_bundle(f"{url}/missing.zip", str(tmp_path / "other" / "eval_bundle"))
    with pytest.raises(UserError, match="nothing to do"):  # one line and exit code 2 through cli.run
        core_bundle.main(["--no-download"])
