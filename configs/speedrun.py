"""The record command: nanochat 92d63d4's recipe at leaderboard run 6's size (runs/speedrun.sh at 92d63d4): d24,
ratio 8, device batch 16, auto total batch (1,048,576 tokens, 5,568 steps), fp8 matmuls (run 6's --fp8)."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(recipe="92d63d4", depth=24, target_param_data_ratio=8.0, device_batch_size=16,
                           fp8=True, model_tag="speedrun"))
