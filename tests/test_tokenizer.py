"""Tokenizer: rustbpe training on a small demo corpus, special tokens, token_bytes, file format, errors."""

import os
import pickle

import numpy as np
import pytest
from conftest import shared_fixture

from jaxchat.data.dataset import build_demo_corpus
from jaxchat.data.tok_train import train_tokenizer
from jaxchat.data.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from jaxchat.runtime.common import UserError

VOCAB = 512


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXCHAT_BASE_DIR", str(root))
        data = build_demo_corpus(str(root / "data"), max_chars=400_000)
        tok = train_tokenizer(data, vocab_size=VOCAB, max_chars=300_000, doc_cap=2_000, out_dir=str(root / "out"))
    return tok, root / "out"


def test_round_trip_and_specials(trained):
    tok, _ = trained
    assert tok.vocab_size == VOCAB
    assert tok.bos_id == VOCAB - len(SPECIAL_TOKENS)
    assert [tok.enc.encode_single_token(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))
    assert tok.enc._pat_str == SPLIT_PATTERN
    text = "def f(x):\n    return x ** 2  # 12345 — naïve 你好 🌍\n\n<|bos|> is plain text here"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.bos_id not in ids  # special-token text in documents is ordinary text
    assert tok.encode(text, prepend_bos=True) == [tok.bos_id] + ids
    assert tok.encode([text, "abc"], prepend_bos=True) == [[tok.bos_id] + ids, tok.encode("abc", prepend_bos=True)]
    assert len(ids) < len(text.encode()) * 0.8  # the merges compress


def test_token_bytes_ref_rule(trained):
    tok, _ = trained
    tb = tok.get_token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (VOCAB,)
    assert (tb[tok.bos_id:] == 0).all()
    assert tb[ord("a")] == 1
    assert tb[0x80] == 3  # a lone continuation byte decodes to U+FFFD: 3 bytes, as nanochat's scripts/tok_train.py counts
    for i in range(256, tok.bos_id):
        assert tb[i] == len(tok.decode([i]).encode("utf-8"))


def test_save_load(trained, tmp_path):
    tok, out = trained
    loaded = Tokenizer.load(str(out))
    assert (out / "token_bytes.npy").exists()
    np.testing.assert_array_equal(loaded.get_token_bytes(), tok.get_token_bytes())
    with open(out / "tokenizer.pkl", "rb") as f:
        assert pickle.load(f).n_vocab == VOCAB  # the file is a plain pickled tiktoken Encoding, like nanochat's
    loaded.save(str(tmp_path))
    again = Tokenizer.load(str(tmp_path))
    assert again.encode("hello world") == tok.encode("hello world")


@pytest.mark.parametrize("name,bos,vocab", [("loader_small", 291, 300), ("core_small", None, None)])
def test_reference_tokenizer_files_load(name, bos, vocab):
    tok = Tokenizer.load(str(shared_fixture(name) / "tokenizer"))
    assert tok.bos_id == (bos if bos is not None else tok.vocab_size - 9)
    assert vocab is None or tok.vocab_size == vocab
    assert tok.get_token_bytes().shape == (tok.vocab_size,)
    assert tok.decode(tok.encode("The quick brown fox.")) == "The quick brown fox."


def test_missing_and_corrupt_files(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"tokenizer_demo/tokenizer.pkl: run `python -m jaxchat.tok_train --demo`"):
        Tokenizer.load(str(tmp_path / "tokenizer_demo"))
    bad = tmp_path / "tokenizer"
    bad.mkdir()
    (bad / "tokenizer.pkl").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(UserError, match=r"tokenizer/tokenizer.pkl is corrupt.*`python -m jaxchat.tok_train`"):
        Tokenizer.load(str(bad))
    (bad / "tokenizer.pkl").write_bytes(pickle.dumps({"not": "an encoding"}))
    with pytest.raises(UserError, match="is corrupt"):
        Tokenizer.load(str(bad))


def test_tok_eval_runs_offline(trained, tmp_path, monkeypatch, capsys):
    from jaxchat import tok_eval

    _, out = trained
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    Tokenizer.load(str(out)).save(str(tmp_path / "tokenizer_demo"))
    monkeypatch.setattr(tok_eval, "offline_encodings", lambda: ({}, ["gpt2", "cl100k_base"]))
    tok_eval.main(["--demo"])
    printed = capsys.readouterr().out
    assert "ours alone" in printed and "korean" in printed and "demo train shard not present" in printed


@pytest.mark.parametrize("argv", [["--vocab-size=0"], ["--demo", "--vocab-size=0"], ["--max-chars=0"]])
def test_tok_train_rejects_impossible_sizes(argv, tmp_path, monkeypatch):
    from jaxchat.data import tok_train
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="must be"):
        tok_train.main(argv)
    assert not (tmp_path / "base_data_demo").exists()  # refused before building anything


def test_a_replaced_tokenizer_is_kept_never_deleted(trained, tmp_path):
    """Tokenizer.save over another tokenizer, even an unreadable one, keeps it beside the directory; a truncated
    tokenizer.pkl is one line naming it (common.read_input)."""
    from jaxchat.data.tokenizer import kept_fingerprints, restore
    tok, out = trained
    target = tmp_path / "tok"
    assert tok.save(str(target)) is None  # nothing there before
    (target / "tokenizer.pkl").write_bytes((out / "tokenizer.pkl").read_bytes()[:100])
    with pytest.raises(UserError, match=rf"{target}/tokenizer.pkl is corrupt or truncated \(100 bytes; "):
        Tokenizer.load(str(target))
    kept = tok.save(str(target))
    assert kept.startswith(f"{target}.unreadable-") and os.path.getsize(os.path.join(kept, "tokenizer.pkl")) == 100
    assert tok.save(str(target)) is None  # the same tokens again: nothing to keep
    assert Tokenizer.load(str(target)).fingerprint() == tok.fingerprint()
    with pytest.raises(UserError, match="kept ones: unreadable-"):
        restore(str(target), "0123456789abcdef")
    assert kept_fingerprints(str(target)) == [os.path.basename(kept).split(".", 1)[1]]


@pytest.mark.entry
@pytest.mark.parametrize("delay", [0.3, 0.5, 2.0])
def test_sigterm_during_tok_train_is_one_line_and_leaves_no_temporary_files(tmp_path, delay):
    """SIGTERM's default action killed tok_train on the spot: no line, `.tmp` files (a half-built demo corpus, a
    half-written tokenizer) left behind. Under cli.run it unwinds like Ctrl-C: the clean-up runs, one line, 143."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import wait_for_handler

    env = dict(os.environ, JAXCHAT_BASE_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "jaxchat.tok_train", "--demo", "--vocab-size=4096"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_handler(proc.pid, signal.SIGTERM)
    time.sleep(delay)  # building the demo corpus, or training
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("tok_train finished before the signal")  # a fast machine: nothing to interrupt
    assert proc.returncode == 143 and err == "interrupted by SIGTERM: exiting\n", (proc.returncode, err[-2000:])
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name], sorted(tmp_path.rglob("*"))
