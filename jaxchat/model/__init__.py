"""nanochat's GPT: every parameter declared once, its layers, the mesh's sharding rules, each recipe's model
constants."""
