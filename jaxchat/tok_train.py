"""`python -m jaxchat.tok_train`: train the BPE tokenizer with rustbpe on the train split (nanochat's
scripts/tok_train.py). Its code is jaxchat/data/tok_train.py; the command keeps its name."""

import sys

from jaxchat.data.tok_train import main, parser
from jaxchat.runtime import cli

if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
