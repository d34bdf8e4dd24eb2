"""d26 at ratio 8.25: GPT-2 capability by undertraining a bigger model (14,452 steps; device batch 16)."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(depth=26, target_param_data_ratio=8.25, device_batch_size=16, model_tag="d26",
                           core_metric_every=999999, sample_every=-1))
