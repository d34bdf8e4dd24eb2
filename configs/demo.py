"""The embedded default: a tiny model on the built-in standard-library corpus; trains on a CPU in a few minutes."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        data="demo",  # corpus and tokenizer (vocab 4096) are built on first use, no network
        depth=4, aspect_ratio=32, head_dim=64, max_seq_len=256, window_pattern="SSSL",
        device_batch_size=16, total_batch_size=4096, num_iterations=300,
        embedding_lr=0.1, warmdown_ratio=0.4,
        eval_every=100, eval_tokens=16 * 256 * 8, core_metric_every=-1, sample_every=150, save_every=100,
        log_every=10, model_tag="demo", run="demo"))  # WandB offline unless you are logged in
