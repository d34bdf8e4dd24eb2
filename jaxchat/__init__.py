"""jaxchat: nanochat base-model pretraining in JAX / Flax NNX."""
