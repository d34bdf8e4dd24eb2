"""Pretraining data: shards downloaded and read, the tokenizer and its training, the packing loader."""
