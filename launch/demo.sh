#!/usr/bin/env bash
# The embedded default on any machine (CPU is fine): stdlib corpus -> tokenizer -> tiny model -> bpb, samples, checkpoint.
# Everything lands in $JAXCHAT_BASE_DIR (default ~/.cache/jaxchat); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -e .
python -m jaxchat.train --config=configs/demo.py "$@"
python -m jaxchat.base_eval --model-tag=demo --eval=sample
