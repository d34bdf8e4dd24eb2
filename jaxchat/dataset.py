"""`python -m jaxchat.dataset`: pretraining shards: download (FineWeb-EDU / ClimbMix), list train/val files, read
them, build the demo corpus. Its code is jaxchat/data/dataset.py; the command keeps its name."""

import sys

from jaxchat.data.dataset import main, parser
from jaxchat.runtime import cli

if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
