"""d20: nanochat's speedrun-scale model (435M scaling params), device batch 32 on 80 GB GPUs."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(depth=20, device_batch_size=32, model_tag="d20"))
