"""Paths and names: every path from the environment or a flag is expanded (`~`, relative) once, in
common.user_path; every name that becomes a folder (a model tag) stays inside its parent or is one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxchat.runtime.common import UserError, base_dir, user_path

REPO = Path(__file__).resolve().parents[1]


def test_user_path_expands_tilde_and_relative_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert user_path("~/jc") == str(tmp_path / "home" / "jc")
    assert user_path("runs/../nc") == str(tmp_path / "nc")
    assert user_path(user_path("~/jc")) == user_path("~/jc")  # idempotent: expanding twice changes nothing
    assert user_path("gs://bucket/cache") == "gs://bucket/cache" and user_path("") == "" and user_path(None) is None


@pytest.mark.entry
def test_a_tilde_base_dir_is_the_home_folder_for_writers_and_readers(tmp_path):
    """JAXCHAT_BASE_DIR="~/jc" (quoted in a job script, so the shell left the `~`) wrote into ./~/jc, then pyarrow,
    which expands `~` itself, read elsewhere. Now every command writes and reads $HOME/jc."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    env = dict(os.environ, HOME=str(home), JAXCHAT_BASE_DIR="~/jc", PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    for argv in (["jaxchat.dataset", "--demo"],
                 ["jaxchat.tok_train", "--demo", "--max-chars=50000", "--vocab-size=300"]):
        r = subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
    assert not list(cwd.iterdir())  # no folder named `~` here
    assert (home / "jc" / "base_data_demo").is_dir() and (home / "jc" / "tokenizer_demo" / "tokenizer.pkl").is_file()


def test_path_flags_are_expanded_where_parsed(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JAXCHAT_BASE_DIR", "~/jc")
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    from jaxchat import base_eval, export
    from jaxchat.data import tok_train
    from jaxchat.eval import core_bundle
    from jaxchat.runtime import compile_cache
    from jaxchat.training.config import parse_flags

    assert base_dir() == str(home / "jc")
    assert parse_flags(["--init-from=~/nc/base_checkpoints/d4"]).init_from == str(home / "nc/base_checkpoints/d4")
    assert parse_flags(["--init-from=nc"]).init_from == str(tmp_path / "nc")
    assert parse_flags([]).init_from == ""  # '' keeps meaning "none"
    args = base_eval.parse_args(["--bundle=~/b", "--json=out/r.json", "--tokenizer-dir=~/t",
                                 "--eval=bpb"])
    assert (args.bundle, args.json, args.tokenizer_dir) == (str(home / "b"), str(tmp_path / "out/r.json"),
                                                            str(home / "t"))
    assert base_eval.parse_args(["--nanochat-checkpoint=~/m.pt"]).nanochat_checkpoint == str(home / "m.pt")
    args = export.parse_args(["--model-tag=d4", "--to=~/nc", "--tokenizer-dir=tok"])
    assert (args.to, args.tokenizer_dir) == (str(home / "nc"), str(tmp_path / "tok"))
    assert tok_train.parser().parse_args(["--out-dir=~/tok"]).out_dir == str(home / "tok")
    assert core_bundle.parser().parse_args(["--dest=~/eb"]).dest == str(home / "eb")
    assert compile_cache.resolve("~/cache") == str(home / "cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "~/jcache")
    assert compile_cache.resolve("auto") == str(home / "jcache")


@pytest.mark.parametrize("tag", ["..", ".", "../other", "a/b", "/abs", ""])
def test_a_model_tag_that_leaves_its_folder_is_one_line(tag, tmp_path, monkeypatch):
    """A model tag is one folder under base_checkpoints/ (and tensorboard/): '..' made a run lock, roll back and
    write checkpoints in the base dir itself. checkpoint.checkpoint_dir, which every reader and writer of a tag
    shares, refuses it; train's and export's flags are refused at start-up by the same check."""
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    from jaxchat import export
    from jaxchat.runtime.checkpoint import checkpoint_dir
    from jaxchat.training.config import parse_flags

    with pytest.raises(UserError, match=r"--model-tag=.* must be a plain folder name"):
        checkpoint_dir(tag)
    if tag:  # '' is train's default (d<depth>) and export's --tag default (its --model-tag)
        with pytest.raises(UserError, match=r"^--model-tag=.* must be a plain folder name"):
            parse_flags([f"--model-tag={tag}"])
        with pytest.raises(UserError, match=r"^--tag=.* must be a plain folder name"):
            export.parse_args(["--model-tag=d4", f"--to={tmp_path}", f"--tag={tag}"])
    with pytest.raises(UserError, match=r"^--model-tag=.* must be a plain folder name"):
        export.parse_args([f"--model-tag={tag}", f"--to={tmp_path}"])
    assert not list(tmp_path.iterdir())  # nothing created
