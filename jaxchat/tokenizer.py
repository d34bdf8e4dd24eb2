"""The BPE tokenizer: a tiktoken Encoding saved as tokenizer.pkl (nanochat's file format) plus token_bytes.npy."""

import hashlib
import os
import pickle

import numpy as np
import tiktoken

from jaxchat.common import UserError, base_dir

# nanochat/tokenizer.py SPLIT_PATTERN: GPT-4's pattern with \p{N}{1,2} instead of {1,3}.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
BOS = "<|bos|>"


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
    """tiktoken Encoding + BOS id + per-token byte lengths."""

    def __init__(self, enc: tiktoken.Encoding, token_bytes: np.ndarray | None = None):
        self.enc = enc
        self.bos_id: int = enc.encode_single_token(BOS)
        self.vocab_size: int = enc.n_vocab
        self._token_bytes = token_bytes

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
        h = hashlib.sha256()
        for i in range(self.vocab_size):
            h.update(self.enc.decode_single_token_bytes(i) + b"\0")
        return h.hexdigest()[:16]

    def save(self, directory: str) -> None:
        """Write tokenizer.pkl (pickled tiktoken Encoding) and token_bytes.npy, each via a temp file + rename."""
        os.makedirs(directory, exist_ok=True)
        pkl, npy = os.path.join(directory, "tokenizer.pkl"), os.path.join(directory, "token_bytes.npy")
        with open(pkl + ".tmp", "wb") as f:
            pickle.dump(self.enc, f)
        with open(npy + ".tmp", "wb") as f:
            np.save(f, self.get_token_bytes())
        os.replace(npy + ".tmp", npy)
        os.replace(pkl + ".tmp", pkl)  # last: tokenizer.pkl present means the directory is complete

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        """Load tokenizer.pkl (and token_bytes.npy when present, else compute it); UserError if missing or broken."""
        pkl = os.path.join(directory, "tokenizer.pkl")
        if not os.path.exists(pkl):
            raise UserError(f"no tokenizer at {pkl}: run `{train_command(directory)}`")
        try:
            with open(pkl, "rb") as f:
                enc = pickle.load(f)
            if not isinstance(enc, tiktoken.Encoding) or BOS not in enc.special_tokens_set:
                raise ValueError(f"not a tiktoken Encoding with {BOS}")
        except Exception as e:  # unpickling garbage raises many different types
            raise UserError(f"{pkl} is corrupt ({type(e).__name__}: {e}): re-create it with "
                            f"`{train_command(directory)}`") from None
        npy = os.path.join(directory, "token_bytes.npy")
        token_bytes = None
        if os.path.exists(npy):
            try:
                token_bytes = np.load(npy)
            except Exception as e:
                raise UserError(f"{npy} is corrupt ({e}): re-create it with `{train_command(directory)}`") from None
            if token_bytes.shape != (enc.n_vocab,):
                raise UserError(f"{npy} has shape {token_bytes.shape}, expected ({enc.n_vocab},): "
                                f"re-create it with `{train_command(directory)}`")
            token_bytes = token_bytes.astype(np.int32)
        return cls(enc, token_bytes)
