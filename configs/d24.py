"""d24 at ratio 12: the first GPT-2 leaderboard recipe (16,704 steps; device batch 16, 32 runs out of memory)."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(depth=24, target_param_data_ratio=12.0, device_batch_size=16, model_tag="d24"))
