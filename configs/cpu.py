"""Like the reference's CPU example: a d4 model with short sequences on real data, for checking a setup on a laptop."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(depth=4, max_seq_len=512, device_batch_size=1, total_batch_size=512, eval_every=50,
                           eval_tokens=512 * 8, core_metric_every=-1, sample_every=50, num_iterations=50,
                           model_tag="cpu_d4"))
