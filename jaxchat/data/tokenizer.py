"""The BPE tokenizer: a tiktoken Encoding saved as tokenizer.pkl (nanochat's file format) plus token_bytes.npy.

A checkpoint records its tokenizer's fingerprint. A tokenizer is never overwritten by another: the old one is kept
beside its directory as `<directory>.<fingerprint>/` (`python -m jaxchat.tok_train --restore=<fingerprint>` puts
it back), and every reader of a checkpoint checks the tokenizer it would use through `check_recorded`.
"""

import contextlib
import glob
import hashlib
import os
import pickle
import shutil

import numpy as np
import tiktoken

from jaxchat.runtime.common import UserError, base_dir, print0, read_input, replacing, user_path

# nanochat/tokenizer.py SPLIT_PATTERN: GPT-4's pattern with \p{N}{1,2} instead of {1,3}.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
BOS = "<|bos|>"
# A tokenizer directory's files, jaxchat's and nanochat's (token_bytes.pt): tokenizer.pkl first, as it marks the
# directory as holding a tokenizer.
FILES = ("tokenizer.pkl", "token_bytes.npy", "token_bytes.pt")


def default_dir(source: str = "fineweb-edu") -> str:
    """Where tok_train saves and the trainer loads the tokenizer of a data source."""
    return os.path.join(base_dir(), "tokenizer_demo" if source == "demo" else "tokenizer")


def train_command(directory: str) -> str:
    """The command that (re)creates the tokenizer in `directory`."""
    if os.path.abspath(directory) == os.path.abspath(default_dir("demo")):
        return "python -m jaxchat.tok_train --demo"
    if os.path.abspath(directory) == os.path.abspath(default_dir()):
        return "python -m jaxchat.tok_train"
    return f"python -m jaxchat.tok_train --out-dir {directory}"


def encoding_from_ranks(mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> tiktoken.Encoding:
    """tiktoken Encoding with the 9 special tokens after the BPE tokens (nanochat/tokenizer.py RustBPETokenizer)."""
    offset = len(mergeable_ranks)
    special = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special)


def compute_token_bytes(enc: tiktoken.Encoding, raw: bool = False) -> np.ndarray:
    """int32 byte length per token, 0 for special tokens.

    As nanochat 348fbb3's scripts/tok_train.py computes token_bytes: via a str round trip, so a partial UTF-8 sequence
    decodes to U+FFFD and counts 3 bytes; raw: the token's own bytes, as nanochat 92d63d4's.
    """
    special = set(enc.special_tokens_set)
    out = np.zeros(enc.n_vocab, dtype=np.int32)
    for i in range(enc.n_vocab):
        text = enc.decode([i])
        size = len(enc.decode_single_token_bytes(i)) if raw else len(text.encode("utf-8"))
        out[i] = 0 if text in special else size
    return out


class Tokenizer:
    """tiktoken Encoding + BOS id + per-token byte lengths (+ the directory it was loaded from, None if built here)."""

    def __init__(self, enc: tiktoken.Encoding, token_bytes: np.ndarray | None = None, directory: str | None = None):
        self.enc = enc
        self.bos_id: int = enc.encode_single_token(BOS)
        self.vocab_size: int = enc.n_vocab
        self.directory = directory
        self._token_bytes = token_bytes
        self._fingerprint: str | None = None

    def encode(self, text: str | list[str], prepend_bos: bool = False, num_threads: int = 8):
        """Token ids of a string, or a list of id lists for a list of strings (threads); special-token text is plain."""
        prefix = [self.bos_id] if prepend_bos else []
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text)
        return [prefix + ids for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids) -> str:
        """Text of a list of token ids."""
        return self.enc.decode(list(ids))

    def get_token_bytes(self, raw: bool = False) -> np.ndarray:
        """(vocab_size,) int32 byte length of each token, 0 for special tokens; used for bits per byte.

        raw: from each token's raw bytes (recipe 92d63d4), computed here; else token_bytes.npy's (348fbb3's rule)."""
        if raw:
            return compute_token_bytes(self.enc, raw=True)
        if self._token_bytes is None:
            self._token_bytes = compute_token_bytes(self.enc)
        return self._token_bytes

    def fingerprint(self) -> str:
        """A short hash of every token's bytes: a checkpoint records it, a resume with another tokenizer notices."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for i in range(self.vocab_size):
                h.update(self.enc.decode_single_token_bytes(i) + b"\0")
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def save(self, directory: str) -> str | None:
        """Write tokenizer.pkl (pickled tiktoken Encoding) and token_bytes.npy, each via a temp file + rename; another
        tokenizer already there is kept aside first (never overwritten): returns where it went, or None."""
        kept = keep_aside(directory, unless=self.fingerprint())
        os.makedirs(directory, exist_ok=True)
        pkl, npy = os.path.join(directory, "tokenizer.pkl"), os.path.join(directory, "token_bytes.npy")
        with replacing(npy) as tmp, open(tmp, "wb") as f:
            np.save(f, self.get_token_bytes())
        with replacing(pkl) as tmp, open(tmp, "wb") as f:  # last: tokenizer.pkl present means the directory is complete
            pickle.dump(self.enc, f)
        self.directory = directory
        return kept

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        """Load tokenizer.pkl (and token_bytes.npy when present, else compute it); UserError if missing or broken."""
        fix = f"run `{train_command(directory)}`"
        enc = read_input(os.path.join(directory, "tokenizer.pkl"), _read_encoding, "tokenizer", fix)
        npy = os.path.join(directory, "token_bytes.npy")
        token_bytes = read_input(npy, np.load, "token-bytes file", fix) if os.path.exists(npy) else None
        if token_bytes is not None:
            if token_bytes.shape != (enc.n_vocab,):
                raise UserError(f"{npy} has shape {token_bytes.shape}, expected ({enc.n_vocab},): {fix}")
            token_bytes = token_bytes.astype(np.int32)
        return cls(enc, token_bytes, directory)


def _read_encoding(path: str) -> tiktoken.Encoding:
    with open(path, "rb") as f:
        enc = pickle.load(f)
    if not isinstance(enc, tiktoken.Encoding) or BOS not in enc.special_tokens_set:
        raise ValueError(f"not a tiktoken Encoding with {BOS}")
    return enc


# ---------------------------------------------------------------------------------------------------------------
# Replaced tokenizers are kept, found again by fingerprint, and checked against what a checkpoint records


def kept_dir(directory: str, fingerprint: str) -> str:
    """Where a replaced tokenizer of `directory` is kept: beside it, named by its fingerprint."""
    return f"{os.path.abspath(directory)}.{fingerprint}"


def kept_fingerprints(directory: str) -> list[str]:
    """Fingerprints of the tokenizers kept beside `directory`."""
    prefix = os.path.abspath(directory) + "."
    return sorted(p[len(prefix):] for p in glob.glob(glob.escape(prefix) + "*")
                  if os.path.isfile(os.path.join(p, "tokenizer.pkl")))


def keep_aside(directory: str, unless: str | None = None) -> str | None:
    """Move the tokenizer in `directory` to kept_dir(directory, its fingerprint); that folder, or None when the
    directory holds none or holds the tokenizer `unless` (a fingerprint: the same tokens, nothing to keep)."""
    pkl = os.path.join(directory, "tokenizer.pkl")
    if not os.path.exists(pkl):
        return None
    try:
        fingerprint = Tokenizer.load(directory).fingerprint()
    except UserError:  # unreadable: kept all the same, named by its bytes
        with open(pkl, "rb") as f:
            fingerprint = "unreadable-" + hashlib.sha256(f.read()).hexdigest()[:8]
    if fingerprint == unless:
        return None
    aside = kept_dir(directory, fingerprint)
    os.makedirs(aside, exist_ok=True)
    for name in FILES:  # tokenizer.pkl first: from then on the directory holds no tokenizer rather than a mix
        with contextlib.suppress(FileNotFoundError):
            os.replace(os.path.join(directory, name), os.path.join(aside, name))
    return aside


def restore(directory: str, which: str) -> tuple[Tokenizer, str | None]:
    """Put a tokenizer back into `directory`: a kept one (by fingerprint) or any directory holding tokenizer.pkl (a
    nanochat base directory's tokenizer/). The one there is kept aside first. (the tokenizer now in place, where the
    previous one went or None)."""
    folder = user_path(which)  # a folder (~ and relative too), else a fingerprint
    source = folder if os.path.isfile(os.path.join(folder, "tokenizer.pkl")) else kept_dir(directory, which)
    if not os.path.isfile(os.path.join(source, "tokenizer.pkl")):
        kept = kept_fingerprints(directory)
        raise UserError(f"--restore={which}: neither a kept tokenizer of {directory} nor a directory holding "
                        f"tokenizer.pkl; kept ones: {', '.join(kept) if kept else 'none'}")
    tok = Tokenizer.load(source)  # checked before anything moves
    if os.path.abspath(source) == os.path.abspath(directory):
        return tok, None
    aside = keep_aside(directory, unless=tok.fingerprint())
    os.makedirs(directory, exist_ok=True)
    for name in reversed(FILES):  # tokenizer.pkl last: present means complete
        if os.path.exists(src := os.path.join(source, name)):
            with replacing(os.path.join(directory, name)) as tmp:
                shutil.copyfile(src, tmp)
    return Tokenizer.load(directory), aside


def check_recorded(tok: Tokenizer, recorded: str | None, whose: str, *, flag: str | None = None,
                   chosen: bool = False, recorded_at: str | None = None, otherwise: str = "") -> Tokenizer:
    """The tokenizer to use with a checkpoint that records the fingerprint `recorded` (None: it records none).

    Every reader of a checkpoint (resume, --init-from, base_eval, export) checks its tokenizer here. `tok` is the one
    the command would use. When it is another, a reader that takes its tokenizer from a flag (`flag`, e.g.
    --tokenizer-dir) it was not given (`chosen` False) uses the right one if it is found (kept aside by tok_train, or
    `recorded_at`), saying so; anything else is one line saying where the right one is and how to use it.
    """
    if recorded is None or tok.fingerprint() == recorded:
        return tok
    directory = tok.directory or "the tokenizer given"
    kept = kept_dir(directory, recorded) if tok.directory else None
    where = recorded_at or (kept if kept and os.path.isfile(os.path.join(kept, "tokenizer.pkl")) else None)
    if where and flag and not chosen:
        right = Tokenizer.load(where)
        if right.fingerprint() == recorded:
            print0(f"Tokenizer: {where}, the one {whose} was trained with ({directory} holds another)")
            return right
    head = f"{whose} was trained with tokenizer {recorded}, but {directory} holds {tok.fingerprint()}"
    otherwise = f", or {otherwise}" if otherwise else ""
    if where:
        use = (f"pass {flag}={where}" if flag else f"put it in place with `{train_command(directory)} "
               f"--restore={recorded if where == kept else where}` (the current one is kept aside)")
        raise UserError(f"{head}; the one it needs is in {where}: {use}{otherwise}")
    raise UserError(f"{head}, and no copy of it is kept ({kept or 'no tokenizer directory'} does not exist): use the "
                    f"tokenizer it was trained with{f' ({flag}=DIR)' if flag else ''} (the same tok_train arguments "
                    f"on the same shards give it again){otherwise}")
