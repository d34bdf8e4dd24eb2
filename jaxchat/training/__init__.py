"""The train step as a library: the flags, the two recipes and the MuonAdamW optimizer they configure, the plan,
memory prediction, and what aot reads from the compiled program (kernel inventory, roofline
projection)."""
