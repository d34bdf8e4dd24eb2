"""`python -m jaxchat.core_bundle`: the CORE eval bundle (DCLM's core.yaml, eval_meta_data.csv and eval_data/):
download once, locate, check. Its code is jaxchat/eval/core_bundle.py; the command keeps its name."""

import sys

from jaxchat.eval.core_bundle import main, parser
from jaxchat.runtime import cli

if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
