"""XLA GPU flags the JAX GPU community recommends for LLM training, and the GPU memory JAX may take, applied before
the backend starts.

XLA reads $XLA_FLAGS once, when the first backend initialises; so `apply()` must run before anything asks JAX for
devices: every command applies it first (jaxchat.runtime.cli), so training, evaluation and jaxchat.aot compile with the
same options. A flag the user already set in $XLA_FLAGS keeps the user's value; JAXCHAT_XLA_FLAGS=0 turns the defaults
off (to measure them: `bench/throughput.py --no-xla-flags`). The flags only affect GPU compilation (CPU ignores
them), and every one is checked by a test to be known to the installed jaxlib: an unknown flag aborts the process.

GPU memory: JAX's allocator takes 75% of a GPU unless told otherwise, so an 80 GB H100 would give a step about 59 GiB
(PyTorch's caching allocator, nanochat's, can grow to nearly all of it). jaxchat asks for MEMORY_FRACTION; a user's
$XLA_PYTHON_CLIENT_MEM_FRACTION or $XLA_PYTHON_CLIENT_PREALLOCATE wins.
"""

import os

GPU_FLAGS = {
    # Schedule collectives (gradient reduce-scatter, FSDP all-gathers) to overlap with compute.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    # cuBLAS for plain bf16 GEMMs rather than Triton-generated kernels.
    "xla_gpu_enable_triton_gemm": "false",
    # Collectives on a high-priority stream, so they are not starved by long compute kernels.
    "xla_gpu_enable_highest_priority_async_stream": "true",
    # Combine the per-leaf gradient collectives into few large ones (fewer, fuller NCCL launches).
    "xla_gpu_all_reduce_combine_threshold_bytes": str(128 * 2**20),
    "xla_gpu_all_gather_combine_threshold_bytes": str(128 * 2**20),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(64 * 2**20),
    # Unroll the layer scan's while loop by two so the next layer's all-gather overlaps this layer's compute.
    "xla_gpu_enable_while_loop_double_buffering": "true",
    # XLA's HLO rematerialisation pass runs before scheduling, misjudges the step's memory (d24 at device batch 16:
    # "only reduced to 97.21GiB" where the final buffer assignment is 60.45 GiB either way) and clones kernels to
    # recompute them (1,180 extra kernel runs per step). jaxchat plans memory itself from XLA's final figure
    # (jaxchat.training.memory: --device-batch-size=auto, --remat policies), so the pass only costs time.
    "xla_disable_hlo_passes": "rematerialization",
}
# Not set: xla_gpu_enable_analytical_latency_estimator. Compiled for 8 H100s (python -m jaxchat.aot --depth=12
# --device-batch-size=8, with and without it) it leaves this step's schedule as it is: peak 9.2 GiB either way, the
# roofline projection (jaxchat.training.projection) 149.6 against 149.7 ms. (Before the once-per-step gradient reduction
# it moved the peak from 9.46 to 12.65 GiB.) Its own estimate (--xla_dump_latency_hiding_schedule) totals 7.9e11
# "cycles" at 1 per microsecond for that step, nine days: no unit to read a step time from.


# The rest stays for the CUDA context, NCCL's buffers and cuDNN/cuBLAS workspaces outside JAX's allocator (~2-4 GB).
MEMORY_FRACTION = 0.95
MEMORY_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def memory_fraction() -> float:
    """The fraction of a GPU's memory JAX's allocator takes: the user's setting, else jaxchat's."""
    return float(os.environ.get(MEMORY_FRACTION_VAR, MEMORY_FRACTION))


def merged(user_flags: str, defaults: dict[str, str] = GPU_FLAGS) -> str:
    """$XLA_FLAGS with each default added unless the user set that flag already."""
    user_names = {f.removeprefix("--").split("=", 1)[0] for f in user_flags.split()}
    added = [f"--{name}={value}" for name, value in defaults.items() if name not in user_names]
    return " ".join([user_flags.strip(), *added]).strip()


def apply() -> None:
    """Put the recommended GPU flags into $XLA_FLAGS (call before JAX initialises a backend)."""
    if os.environ.get("JAXCHAT_XLA_FLAGS", "1") == "0":
        return
    os.environ["XLA_FLAGS"] = merged(os.environ.get("XLA_FLAGS", ""))
    if "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ:  # no preallocation: the user manages memory
        os.environ.setdefault(MEMORY_FRACTION_VAR, str(MEMORY_FRACTION))
