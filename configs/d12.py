"""d12: the small nanochat model (110M scaling params), about 2,200 steps at ratio 10.5."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(depth=12, device_batch_size=32, model_tag="d12"))
