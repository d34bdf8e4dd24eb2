"""Compression ratio (bytes per token) of our tokenizer against the others available offline.

As nanochat's scripts/tok_eval.py (print_comparison), with the baselines that load without a download.

    python -m jaxchat.tok_eval            # ours = $JAXCHAT_BASE_DIR/tokenizer (else tokenizer_demo)
    python -m jaxchat.tok_eval --demo     # ours = the demo tokenizer
"""

import argparse
import os
import sys
from contextlib import contextmanager

import tiktoken
import tiktoken.load

from jaxchat.data import dataset
from jaxchat.data.tokenizer import Tokenizer, default_dir
from jaxchat.runtime import cli
from jaxchat.runtime.common import JAXCHAT_ONLY, UserError, cli_parser

SAMPLES = {
    "news": (
        "The city council voted 7-2 on Tuesday to approve a $48 million plan to rebuild the aging Harbor Street "
        "bridge, ending a debate that lasted nearly three years. Construction is expected to begin next spring and "
        "to close the bridge to traffic for about 14 months. \"This is the most important infrastructure decision "
        "we will make this decade,\" said council member Ana Ortiz, who sponsored the measure. Opponents argued that "
        "the cost estimates were outdated and that local businesses near the bridge had not been consulted."),
    "korean": (
        "한국어는 주로 대한민국과 조선민주주의인민공화국에서 사용되는 언어이다. 한글은 15세기에 세종대왕이 "
        "창제하였으며, 자음과 모음을 조합하여 음절 단위로 적는다. 오늘날 전 세계적으로 약 8천만 명이 한국어를 "
        "사용하고 있으며, 최근에는 한국 문화의 인기로 한국어를 배우는 외국인도 크게 늘고 있다."),
    "code": (
        "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
        "    \"\"\"Merge two sorted lists in linear time.\"\"\"\n"
        "    out, i, j = [], 0, 0\n"
        "    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n"
        "            out.append(a[i]); i += 1\n"
        "        else:\n"
        "            out.append(b[j]); j += 1\n"
        "    return out + a[i:] + b[j:]\n\n\n"
        "if __name__ == \"__main__\":\n"
        "    print(merge_sorted([1, 4, 9], [2, 3, 10, 11]))\n"),
    "math": (
        "\\begin{theorem}\nFor every prime $p$ and integer $a$ with $p \\nmid a$, we have "
        "$a^{p-1} \\equiv 1 \\pmod{p}$.\n\\end{theorem}\n\\begin{proof}\nThe map $x \\mapsto ax$ permutes the "
        "nonzero residues $\\{1, 2, \\dots, p-1\\}$, hence $\\prod_{k=1}^{p-1} ak \\equiv \\prod_{k=1}^{p-1} k$, "
        "so $a^{p-1} (p-1)! \\equiv (p-1)! \\pmod{p}$ and $(p-1)!$ is invertible modulo $p$.\n\\end{proof}\n"),
    "science": (
        "Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent "
        "reactions, which take place in the thylakoid membranes of chloroplasts, water molecules are split, "
        "releasing oxygen and producing ATP and NADPH. The Calvin cycle, occurring in the stroma, then uses these "
        "molecules to fix carbon dioxide into three-carbon sugars. Roughly 6 CO2 + 6 H2O -> C6H12O6 + 6 O2."),
}


@contextmanager
def _offline():
    """Make tiktoken's downloader fail, so an encoding loads only from its local cache."""
    real = tiktoken.load.read_file

    def refuse(blobpath: str) -> bytes:
        raise OSError("offline: not in the tiktoken cache")

    tiktoken.load.read_file = refuse
    try:
        yield
    finally:
        tiktoken.load.read_file = real


def offline_encodings(names: tuple[str, ...] = ("gpt2", "cl100k_base")) -> tuple[dict, list[str]]:
    """The tiktoken encodings loadable from the local cache, and the names of those that are not."""
    found, missing = {}, []
    with _offline():
        for name in names:
            try:
                found[name] = tiktoken.get_encoding(name)
            except Exception:
                missing.append(name)
    return found, missing


def _first_row_group(files: list[str]) -> str:
    return "\n".join(dataset.read_texts(files[0], 0))


def eval_texts(source: str) -> dict[str, str]:
    """The embedded samples plus the first row group of the source's first train shard and of its val shard."""
    texts = dict(SAMPLES)
    for split in ("train", "val"):
        try:
            texts[f"{source}-{split}"] = _first_row_group(dataset.list_shards(source, split))
        except UserError:
            print(f"({source} {split} shard not present: skipped)")
    return texts


def compare(name: str, base, ours, texts: dict[str, str]) -> None:
    """Print one table: bytes, tokens and bytes/token of a baseline and ours per text."""
    print(f"\nBase = {name} (vocab {base.n_vocab:,}), ours vocab {ours.n_vocab:,}")
    print(f"{'Text':<20} {'Bytes':>9} {'Base tok':>12} {'Ratio':>6} {'Ours tok':>10} {'Ratio':>6} "
          f"{'Rel diff':>9}  Better")
    for label, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        counts = []
        for enc in (base, ours):
            ids = enc.encode_ordinary(text)
            assert enc.decode(ids) == text, f"{label}: round trip failed"
            counts.append(len(ids))
        diff = (counts[0] - counts[1]) / counts[0] * 100
        better = "ours" if counts[1] < counts[0] else (name if counts[0] < counts[1] else "tie")
        print(f"{label:<20} {n_bytes:>9,} {counts[0]:>12,} {n_bytes / counts[0]:>6.2f} {counts[1]:>10,} "
              f"{n_bytes / counts[1]:>6.2f} {diff:>+8.1f}%  {better}")


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m jaxchat.tok_eval` (nanochat's scripts/tok_eval.py takes no flags)."""
    p = cli_parser(__doc__)
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=False,
                   help=JAXCHAT_ONLY + "evaluate the demo tokenizer ($JAXCHAT_BASE_DIR/tokenizer_demo)")
    return p


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    real, demo = default_dir("fineweb-edu"), default_dir("demo")
    ours_dir = demo if args.demo or not os.path.exists(os.path.join(real, "tokenizer.pkl")) else real
    ours = Tokenizer.load(ours_dir)
    source = "demo" if ours_dir == demo else "fineweb-edu"
    print(f"Ours: {ours_dir} (vocab {ours.vocab_size:,})")
    baselines, missing = offline_encodings()
    if missing:
        print(f"tiktoken {', '.join(missing)} not in the local tiktoken cache (they need a one-time download): "
              f"skipped")
    other = real if ours_dir == demo else demo
    if os.path.exists(os.path.join(other, "tokenizer.pkl")):
        baselines[os.path.basename(other)] = Tokenizer.load(other).enc
    texts = eval_texts(source)
    if not baselines:
        print("no other tokenizer available offline: ours alone")
        for label, text in texts.items():
            n_bytes, n_tok = len(text.encode("utf-8")), len(ours.encode(text))
            print(f"{label:<20} {n_bytes:>9,} bytes {n_tok:>9,} tokens {n_bytes / n_tok:>6.2f} bytes/token")
    for name, enc in baselines.items():
        compare(name, enc, ours.enc, texts)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
