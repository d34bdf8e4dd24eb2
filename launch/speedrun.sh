#!/usr/bin/env bash
# GPT-2 capability on one 8xGPU node, nanochat's leaderboard recipe: d24, ratio 12, device batch 16 (nanochat's runs/speedrun.sh, leaderboard run 1).
# Usage: bash launch/speedrun.sh [extra train flags], e.g. --run=my-run for WandB.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -e ".[cuda12]"

# Data: d24 at ratio 12 trains on 8.76B tokens; at ~34M usable tokens per shard that is ~260 shards (+ margin).
# The tokenizer trains on the first shards while the rest download.
python -m jaxchat.dataset -n 8
python -m jaxchat.dataset -n 300 &
DOWNLOAD_PID=$!
python -m jaxchat.tok_train
python -m jaxchat.tok_eval
python -m jaxchat.core_eval --download
wait $DOWNLOAD_PID

# One process drives all 8 local GPUs (JAX is single-controller per host).
python -m jaxchat.train --config=configs/d24.py --core-metric-every=999999 --sample-every=-1 "$@"
python -m jaxchat.base_eval --model-tag=d24 --max-per-task=-1
