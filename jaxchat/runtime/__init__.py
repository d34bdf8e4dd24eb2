"""The process and its hardware: errors and files, the backend decision, XLA flags, the compilation cache, multi-
process start-up, faults, host memory, monitoring, the GPU and TPU targets, checkpoints."""
