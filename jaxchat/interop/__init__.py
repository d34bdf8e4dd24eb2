"""nanochat's files: its state dict to jaxchat's parameters and back, its checkpoint directory."""
