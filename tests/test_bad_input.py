"""Bad command lines and configs: each is one line that says what to do (a UserError, exit code 2), never a traceback."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import TINY_RUN
from jaxchat.common import UserError

TINY = TINY_RUN + ["--num-iterations=2", "--eval-every=-1"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base dir with the demo corpus, its tokenizer and a 2-step checkpoint of the TINY model (tag 'tiny')."""
    from jaxchat.train import train
    path = tmp_path_factory.mktemp("bad_input")
    old = os.environ.get("JAXCHAT_BASE_DIR")
    os.environ["JAXCHAT_BASE_DIR"] = str(path)
    train(TINY + ["--model-tag=tiny"])
    # A "fineweb-edu" directory with shards but no tokenizer, and a demo tokenizer of another vocabulary size.
    shutil.copytree(path / "base_data_demo", path / "base_data")
    shards = sorted((path / "base_data").iterdir())
    shards[-1].rename(path / "base_data" / "shard_01822.parquet")
    from jaxchat.tok_train import train_tokenizer
    train_tokenizer(source="demo", vocab_size=1024, max_chars=300_000, doc_cap=10_000, out_dir=str(path / "tok1024"))
    yield path
    if old is None:
        del os.environ["JAXCHAT_BASE_DIR"]
    else:
        os.environ["JAXCHAT_BASE_DIR"] = old


CASES = [
    (["--depth=0"], "--depth=0 must be a positive integer"),
    (["--depth=-4"], "--depth=-4 must be a positive integer"),
    (["--depth=7"], "--depth=7 is odd"),
    (["--depth=abc"], "expected int"),
    (["--device-batch-size=3"], "use --device-batch-size in [1, 2]"),
    (["--device-batch-size=-2"], "--device-batch-size=-2 must be positive"),
    (["--total-batch-size=1000"], "make --total-batch-size a multiple of"),
    (["--bogus=1"], "unrecognized arguments: --bogus=1"),
    (["--config=configs/missing.py"], "no such file"),
    (["--config.nope=1"], "unknown key"),
    (["--data=imagenet"], "choose fineweb-edu, climbmix or demo"),
    (["--data=climbmix"], "python -m jaxchat.dataset"),
    (["--data=fineweb-edu"], "python -m jaxchat.tok_train"),
    (["--fsdp=3"], "--fsdp=3 does not divide the 8 devices"),
    (["--model-tag=tiny", "--resume-from-step=99"], "no checkpoint for step 99"),
    (["--model-tag=none", "--resume-from-step=1"], "no checkpoint in"),
    (["--model-tag=tiny", "--resume-from-step=2", "--depth=4"], "saved 2, now 4"),
    (["--model-tag=tiny", "--resume-from-step=2", "--max-seq-len=32"], "sequence_len: saved 64, now 32"),
    (["--window-pattern=SXL"], "must use only the letters S and L"),
    (["--warmup-ratio=0.7", "--warmdown-ratio=0.5"], "exceeds 1"),
    (["--num-iterations=-1", "--target-param-data-ratio=-1"], "no training horizon"),
    (["--compute-dtype=fp8"], "choose bfloat16 or float32"),
    (["--resume-from-step=soon"], "step number or 'last'"),
    (["--core-metric-every=100"], "python -m jaxchat.core_eval --download"),
    (["--eval-tokens=0"], "--eval-tokens=0 must be positive"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_clear_line(base_dir, argv, message):
    from jaxchat.train import train
    with pytest.raises(UserError) as e:
        train(TINY + argv)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_checkpoint_with_another_tokenizer_vocabulary(base_dir):
    from jaxchat.train import train
    tok_dir = base_dir / "tokenizer_demo"
    shutil.move(tok_dir, base_dir / "tokenizer_demo_4096")
    shutil.copytree(base_dir / "tok1024", tok_dir)
    try:
        with pytest.raises(UserError, match="vocab_size: saved 4096, now 1024.*tokenizer of the saving run"):
            train(TINY + ["--model-tag=tiny", "--resume-from-step=2"])
    finally:
        shutil.rmtree(tok_dir)
        shutil.move(base_dir / "tokenizer_demo_4096", tok_dir)


@pytest.mark.parametrize("argv", [["--depth=7"], ["--device-batch-size=3"], ["--data=fineweb-edu"],
                                  ["--model-tag=tiny", "--resume-from-step=2", "--depth=4"]])
def test_command_line_exit_code_and_no_traceback(base_dir, argv):
    proc = subprocess.run([sys.executable, "-m", "jaxchat.train", *TINY, *argv], capture_output=True, text=True,
                          env=dict(os.environ, JAXCHAT_BASE_DIR=str(base_dir)), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_corrupt_shard_names_the_file(base_dir, tmp_path, monkeypatch):
    from jaxchat.train import train
    shutil.copytree(base_dir / "base_data", tmp_path / "base_data")  # fineweb-edu layout (the demo would rebuild)
    shutil.copytree(base_dir / "tokenizer_demo", tmp_path / "tokenizer")
    shard = sorted((tmp_path / "base_data").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # a download cut short
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError) as e:
        train(TINY + ["--data=fineweb-edu", "--model-tag=shard"])
    assert shard.name in str(e.value) and "\n" not in str(e.value)


def test_corrupt_tokenizer_names_the_file(base_dir, tmp_path, monkeypatch):
    from jaxchat.train import train
    shutil.copytree(base_dir / "base_data_demo", tmp_path / "base_data_demo")
    (tmp_path / "tokenizer_demo").mkdir()
    (tmp_path / "tokenizer_demo" / "tokenizer.pkl").write_bytes(b"\x80\x04garbage")
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"tokenizer\.pkl.*python -m jaxchat\.tok_train --demo"):
        train(TINY + ["--model-tag=tok"])
