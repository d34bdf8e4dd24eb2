"""`python -m jaxchat.core_eval`: CORE evaluation: DCLM's in-context-learning tasks scored as nanochat does
(nanochat/core_eval.py evaluate_task). Its code is jaxchat/eval/core_eval.py; the command keeps its name."""

import sys

from jaxchat.eval import core_bundle
from jaxchat.runtime import cli

if __name__ == "__main__":  # `python -m jaxchat.core_eval --download`: the bundle's command line (core_bundle.py)
    cli.run(core_bundle.main, sys.argv[1:])
