"""`python -m jaxchat.plan`: the training plan in one place: model size from depth, horizon and batch / accumulation
(scripts/base_train.py at 348fbb3), and the recipe's transfer rules (batch LR scale, Muon weight decay; 92d63d4's
auto batch). Its code is jaxchat/training/plan.py; the command keeps its name."""

import sys

from jaxchat.runtime import cli
from jaxchat.training.plan import main

if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
