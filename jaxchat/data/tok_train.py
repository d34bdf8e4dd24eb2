"""Train the BPE tokenizer with rustbpe on the train split (nanochat's scripts/tok_train.py).

    python -m jaxchat.tok_train                   # FineWeb-EDU, 2e9 chars, vocab 32768 -> $JAXCHAT_BASE_DIR/tokenizer
    python -m jaxchat.tok_train --demo            # demo corpus, vocab 4096 -> $JAXCHAT_BASE_DIR/tokenizer_demo
    python -m jaxchat.tok_train --demo --restore=FINGERPRINT   # put a replaced tokenizer back

A tokenizer that checkpoints were trained with is not replaced without --force; a replaced tokenizer is kept beside
its directory as <directory>.<fingerprint>/ (the fingerprint a checkpoint records), never deleted.
"""

import argparse
import os
import time
from collections.abc import Iterator

import rustbpe

from jaxchat.data import dataset
from jaxchat.data import tokenizer as toklib
from jaxchat.data.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, default_dir, encoding_from_ranks
from jaxchat.runtime.common import JAXCHAT_ONLY, UserError, check_output, cli_parser, finite_float, user_path

ROUND_TRIP_TEXT = """Hello world! This is a test.
Numbers: 123, 4567, 89
Contractions: I'm, you're, it's
Special chars: @#$%^&*()
Unicode: 你好世界 🌍"""


def text_iterator(files: list[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Documents of `files`, row group by row group, each cut to doc_cap chars; stops after exceeding max_chars.

    As nanochat's scripts/tok_train.py text_iterator.
    """
    nchars = 0
    for path in files:
        for rg in range(dataset.open_shard(path).num_row_groups):
            for doc in dataset.read_texts(path, rg):
                doc = doc[:doc_cap]
                nchars += len(doc)
                yield doc
                if nchars > max_chars:
                    return


def check_sizes(vocab_size: int, max_chars: int, doc_cap: int) -> None:
    """The flags' valid ranges: --vocab-size >= 256 bytes + the special tokens, the character limits > 0."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size={vocab_size} must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + the "
                        f"special tokens; nanochat uses 32768)")
    if max_chars <= 0 or doc_cap <= 0:
        raise UserError(f"--max-chars={max_chars} and --doc-cap={doc_cap} must be positive")


def train_tokenizer(source: str, vocab_size: int, max_chars: int, doc_cap: int, out_dir: str) -> Tokenizer:
    """Train on the train split of `source` (a source name or a shard directory), check, save to out_dir."""
    check_sizes(vocab_size, max_chars, doc_cap)
    files = dataset.list_shards(source, "train")
    t0 = time.perf_counter()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(text_iterator(files, max_chars, doc_cap), vocab_size - len(SPECIAL_TOKENS),
                            pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    tok = Tokenizer(encoding_from_ranks(ranks, bpe.get_pattern()))
    train_s = time.perf_counter() - t0
    if tok.decode(tok.encode(ROUND_TRIP_TEXT)) != ROUND_TRIP_TEXT:
        raise RuntimeError("tokenizer round trip failed")
    kept = tok.save(out_dir)
    token_bytes = tok.get_token_bytes()
    nonzero = token_bytes[token_bytes > 0]
    print(f"Trained vocab {tok.vocab_size} (BOS {tok.bos_id}) on {len(files)} shard(s) in {train_s:.1f}s; "
          f"token bytes min {nonzero.min()} max {nonzero.max()} mean {nonzero.mean():.2f}; saved to {out_dir}",
          flush=True)
    if kept:
        print(f"The tokenizer it replaces is kept in {kept}: `{toklib.train_command(out_dir)} "
              f"--restore={kept[len(toklib.kept_dir(out_dir, '')):]}` puts it back", flush=True)
    if tok.vocab_size < vocab_size:
        print(f"note: the corpus only supported {tok.vocab_size} of the {vocab_size} tokens asked for", flush=True)
    return tok


def check_replace(out_dir: str, force: bool) -> None:
    """Before training: refuse (without --force) to replace a tokenizer that checkpoints were trained with (they
    could not be resumed or evaluated with another), and check out_dir can be written."""
    check_output(out_dir, "--out-dir", directory=True)
    try:
        old = Tokenizer.load(out_dir) if os.path.exists(os.path.join(out_dir, "tokenizer.pkl")) else None
    except UserError:
        old = None  # unreadable: nothing can use it as it is (it is kept aside all the same)
    if old is None or force:
        return
    from jaxchat.runtime.checkpoint import tokenizer_users  # orbax is slow to import: only when there is a tokenizer

    if users := tokenizer_users(old.fingerprint()):
        raise UserError(f"{out_dir} holds tokenizer {old.fingerprint()}, which checkpoints were trained with "
                        f"({'; '.join(users[:4])}{'; ...' if len(users) > 4 else ''}): pass --force to train a new "
                        f"one anyway (the old one is kept in {toklib.kept_dir(out_dir, old.fingerprint())}, and "
                        f"--restore={old.fingerprint()} puts it back), or train into another --out-dir")


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m jaxchat.tok_train` (nanochat's scripts/tok_train.py flags, plus jaxchat's)."""
    p = cli_parser(__doc__)
    p.add_argument("--max-chars", type=finite_float, default=2e9, help="maximum characters to train on")
    p.add_argument("--doc-cap", type=int, default=10_000, help="maximum characters kept per document")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size including the special tokens (default: 32768 = 2^15, 4096 with --demo)")
    data = p.add_argument_group("data and output (jaxchat)")
    data.add_argument("--source", default="fineweb-edu", choices=sorted(dataset.SOURCES),
                      help=JAXCHAT_ONLY + "corpus whose train split is read")
    data.add_argument("--demo", action=argparse.BooleanOptionalAction, default=False,
                      help=JAXCHAT_ONLY + "train on the offline demo corpus (built if missing) instead of --source")
    data.add_argument("--out-dir", default=None, type=user_path,
                      help=JAXCHAT_ONLY + "where to save "
                      "(default: $JAXCHAT_BASE_DIR/tokenizer, tokenizer_demo with --demo)")
    data.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                      help=JAXCHAT_ONLY + "replace a tokenizer even if checkpoints were trained with it (it is kept "
                      "aside as <out-dir>.<fingerprint>, never deleted)")
    data.add_argument("--restore", default=None, metavar="FINGERPRINT_OR_DIR",
                      help=JAXCHAT_ONLY + "instead of training, put back a kept tokenizer (the fingerprint a "
                      "checkpoint records) or copy one from a directory holding tokenizer.pkl; the current one is "
                      "kept aside")
    return p


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    source = "demo" if args.demo else args.source
    vocab_size = (4096 if args.demo else 32768) if args.vocab_size is None else args.vocab_size
    out_dir = args.out_dir or default_dir(source)
    if args.restore:
        tok, aside = toklib.restore(out_dir, args.restore)
        print(f"Tokenizer {tok.fingerprint()} (vocab {tok.vocab_size}) is in {out_dir}"
              + (f"; the one it replaces is kept in {aside}" if aside else ""), flush=True)
        return
    check_sizes(vocab_size, int(args.max_chars), args.doc_cap)  # before building anything
    check_replace(out_dir, args.force)
    if args.demo:
        dataset.build_demo_corpus()
    train_tokenizer(source, vocab_size, int(args.max_chars), args.doc_cap, out_dir)
