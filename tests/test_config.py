"""Training flags: reference defaults, config files and overrides (bad input: test_bad_input.py)."""

from jaxchat.config import parse_flags


def test_reference_defaults():
    c = parse_flags([])
    assert (c.depth, c.target_param_data_ratio, c.device_batch_size, c.total_batch_size) == (20, 10.5, 32, 524288)
    assert (c.matrix_lr, c.embedding_lr, c.unembedding_lr, c.weight_decay, c.warmdown_ratio) == (0.02, 0.3, 0.004, 0.2, 0.5)
    assert (c.eval_every, c.core_metric_every, c.sample_every, c.save_every, c.run) == (250, 2000, 2000, -1, "dummy")


def test_nanochat_flags_and_config_files():
    c = parse_flags(["--depth=26", "--target-param-data-ratio=8.25", "--device-batch-size=16", "--run=my-run",
                     "--model-tag=my-model", "--sample-every=-1"])
    assert (c.depth, c.target_param_data_ratio, c.device_batch_size, c.run, c.model_tag, c.sample_every) == \
        (26, 8.25, 16, "my-run", "my-model", -1)
    c = parse_flags(["--config=configs/d26.py", "--config.device_batch_size=8"])
    assert (c.depth, c.target_param_data_ratio, c.device_batch_size) == (26, 8.25, 8)
    c = parse_flags(["--config=configs/d26.py", "--config.device_batch_size=8", "--device-batch-size=4"])
    assert c.device_batch_size == 4  # explicit flags win over the config file
