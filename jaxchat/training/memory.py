"""Memory planning: XLA's predicted peak memory per device against the device's capacity, `--device-batch-size=auto`,
and the one-line out-of-memory message.

The prediction is XLA's buffer assignment for the compiled step, per device: its own peak where the platform reports
a true one (GPU, TPU), else arguments + temporaries + outputs not aliased to donated arguments; nothing is allocated
to get it. A compiler that refuses a step that cannot fit (XLA:TPU: RESOURCE_EXHAUSTED at compile time) answers
"does not fit" as well. `plan_step` gets the compiled step from its caller
(jaxchat.training.step.plan_and_compile), and the executable compiled for the prediction is the one training runs, so
planning costs no extra compilation.
"""

import dataclasses
import os
import re
import time
from collections.abc import Callable

import jax

from jaxchat.runtime.common import UserError, fmt_bytes
from jaxchat.training.config import AUTO
from jaxchat.training.plan import grad_accum_steps, valid_device_batch_sizes

SAFETY_MARGIN = 0.9  # a step must be predicted to use at most this fraction of the capacity (fragmentation, runtime)
AUTO_SIZES = (32, 16, 8, 4, 2, 1)  # what auto tries, largest first (nanochat's default device batch is 32)
GiB = 2**30


# Platforms whose `peak_memory_in_bytes` is the peak of every buffer live at once, arguments included. On TPU the
# summed fields do not add up to it: d12 on a v5e chip sums to 17.9 GiB against a 12.99 GiB peak, and a 64 MiB
# intermediate can count as 0 temporaries. XLA:CPU's leaves temporaries out (a program with 64 MiB of them: 0.13 MiB).
PEAK_REPORTED = ("gpu", "tpu")


def _platform(compiled: jax.stages.Compiled) -> str:
    """The platform a compiled program is for: that of its first output's devices ("" without outputs). Not its
    inputs': jax 0.10.2 cannot list them when the program closes over arrays (splash attention's mask tables)."""
    shardings = jax.tree.leaves(compiled.output_shardings)
    return next(iter(shardings[0].device_set)).platform if shardings else ""


def peak_bytes(compiled: jax.stages.Compiled) -> int:
    """Predicted peak bytes per device: XLA's peak where the platform reports one (PEAK_REPORTED), else arguments +
    temporaries + outputs that do not reuse a donated argument."""
    m = compiled.memory_analysis()
    if m is None:  # a backend without buffer statistics
        return 0
    if _platform(compiled) in PEAK_REPORTED and getattr(m, "peak_memory_in_bytes", 0):
        return m.peak_memory_in_bytes
    return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.generated_code_size_in_bytes)


def refused(exc: BaseException) -> str | None:
    """XLA's compile-time out-of-memory refusal, as its first line ("Ran out of memory in memory space hbm ..."); None
    for any other error."""
    if not is_oom(exc):
        return None
    found = re.search(r"RESOURCE_EXHAUSTED: ([^\n]*)", str(exc))
    return (found.group(1) if found else str(exc).splitlines()[0]).strip().rstrip(".")


def device_capacity(budget_gb: float = 0.0, device=None) -> tuple[int, str]:
    """(bytes one device may use, where that number came from): --memory-budget-gb, the GPU's limit, or host RAM."""
    if budget_gb > 0:
        return int(budget_gb * GiB), "--memory-budget-gb"
    device = device or jax.local_devices()[0]
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} bytes_limit"
    # CPU: no device limit; the host's RAM shared by the local (possibly virtual) devices.
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // jax.local_device_count(), f"host RAM / {jax.local_device_count()} local devices (device capacity unknown)"


@dataclasses.dataclass
class StepMemory:
    """The compiled step, its device batch and its predicted memory (what plan_step chose)."""

    compiled: jax.stages.Compiled
    device_batch_size: int
    grad_accum: int
    predicted_bytes: int
    capacity_bytes: int
    capacity_source: str
    compile_seconds: float
    tried: dict[int, int | None]  # device batch -> predicted bytes of its last variant compiled (None: XLA refused all)
    variant: str = ""  # the variant compiled (the remat policy, where several were tried)

    @property
    def fits(self) -> bool:
        return self.predicted_bytes <= SAFETY_MARGIN * self.capacity_bytes

    def summary(self) -> str:
        return (f"Predicted peak memory per device: {fmt_bytes(self.predicted_bytes)} of "
                f"{fmt_bytes(self.capacity_bytes)} ({self.capacity_source}) at --device-batch-size="
                f"{self.device_batch_size}, {self.grad_accum} accumulation step(s)"
                + (f", --remat={self.variant}" if self.variant else "") + "; step compiled in "
                f"{self.compile_seconds:.1f}s")


def plan_step(compile_for: Callable[..., jax.stages.Compiled], *, device_batch_size: int,
              total_batch_size: int, seq_len: int, data_parallel_size: int, budget_gb: float = 0.0,
              capacity: tuple[int, str] | None = None, variants: tuple[str, ...] = ("",),
              log: Callable[[str], None] | None = None) -> StepMemory:
    """Compile the step (`compile_for(device_batch_size, grad_accum, variant)`) and predict its memory; for AUTO, the
    largest of AUTO_SIZES that divides the total batch and fits within SAFETY_MARGIN of the capacity ((bytes, source):
    a target's, when compiling for devices that are not here; None: this process's device). At each device batch the
    variants (remat policies, cheapest first) are tried in order; the first that fits is taken. `log` gets one line
    per compile (they can take minutes each)."""
    capacity, source = capacity or device_capacity(budget_gb)
    if device_batch_size == AUTO:
        valid = valid_device_batch_sizes(total_batch_size, seq_len, data_parallel_size)
        candidates = [b for b in AUTO_SIZES if b in valid]
        if not candidates:
            raise UserError(f"--device-batch-size=auto: --total-batch-size={total_batch_size} is not a multiple of "
                            f"seq_len x devices = {seq_len * data_parallel_size}")
    else:
        candidates = [device_batch_size]
    tried = {}
    candidate, refusal = None, None
    for b in candidates:
        accum = grad_accum_steps(total_batch_size, b, seq_len, data_parallel_size)  # a bad fixed batch fails here
        for variant in variants:
            t0 = time.perf_counter()
            try:
                compiled = compile_for(b, accum, variant)
            except Exception as e:  # the compiler's own "does not fit" (XLA:TPU) is an answer, not a failure
                if (refusal := refused(e)) is None:
                    raise
                tried.setdefault(b, None)
                if log:
                    log(f"device batch {b}{f', remat {variant}' if variant else ''}: XLA refuses it ({refusal}), "
                        f"{time.perf_counter() - t0:.0f} s")
                continue
            candidate = StepMemory(compiled, b, accum, peak_bytes(compiled), capacity, source,
                                   time.perf_counter() - t0, tried, variant)
            tried[b] = candidate.predicted_bytes  # at the last variant tried
            if log:
                log(f"device batch {b}{f', remat {variant}' if variant else ''}: "
                    f"{fmt_bytes(candidate.predicted_bytes)} predicted, {candidate.compile_seconds:.0f} s")
            if candidate.fits:
                return candidate
        if device_batch_size != AUTO:
            if candidate is None:
                raise UserError(f"--device-batch-size={b} does not fit: XLA refuses to compile the step ({refusal}); "
                                f"try --device-batch-size={max(1, b // 2)}, auto, --remat=block or a larger --fsdp")
            return candidate
    need = (f"is predicted to need {fmt_bytes(candidate.predicted_bytes)} per device, over {SAFETY_MARGIN:.0%} of "
            f"{fmt_bytes(capacity)} ({source})"
            if candidate is not None and candidate.device_batch_size == candidates[-1]
            else f"does not fit: XLA refuses to compile it ({refusal})")
    raise UserError(f"--device-batch-size=auto: even device batch {candidates[-1]} {need}; use --remat=block, "
                    f"--loss-chunk=256 or a larger --fsdp")


def attention_pairs(seq_len: int, window_left: int, attention: str) -> int:
    """(query, key) scores one head of one layer holds at once: every block's for jaxchat's blocked CPU attention (it
    keeps their probabilities for the backward: attention._attention_blocks), the whole (T, T) for XLA's path, none
    for the fused kernels (cuDNN, splash), whose memory grows with T only."""
    if attention == "xla":
        return seq_len * seq_len
    if attention != "blocked":
        return 0
    from jaxchat.model.attention import ATTENTION_BLOCKS

    size = -(-seq_len // ATTENTION_BLOCKS)
    return sum((min(seq_len, t0 + size) - t0) * (min(seq_len, t0 + size) - max(0, t0 - window_left))
               for t0 in range(0, seq_len, size))


def minimum_bytes(config, run_backend, device_batch_size: int = 1) -> int:
    """A lower bound of what any training step of this model holds per device, from the shapes alone (nothing
    traced): every layer's input, which every remat policy keeps for the backward, and one layer's attention scores
    (the layer of the smallest window). The planner's prediction needs the step traced and compiled, and tracing a
    length the device can never hold already fails in numpy (--max-seq-len=1048576 on CPU: a 64 GiB mask)."""
    itemsize = 2 if run_backend.compute_dtype in ("bfloat16", "float16") else 4
    scores_itemsize = 4 if run_backend.attention == "blocked" else itemsize  # blocked scores in float32
    T, b = config.sequence_len, device_batch_size
    pairs = min(attention_pairs(T, w, run_backend.attention) for w in config.window_sizes)
    return b * T * config.n_embd * itemsize * config.n_layer + b * config.n_head * pairs * scores_itemsize


def check_length(config, run_backend, budget_gb: float = 0.0, capacity: tuple[int, str] | None = None) -> None:
    """Refuse, before anything is traced, a --max-seq-len that even a device batch of 1 cannot hold (the smallest
    step there is: minimum_bytes), in one line; anything nearer the limit is the planner's to decide."""
    capacity, source = capacity or device_capacity(budget_gb)
    need = minimum_bytes(config, run_backend, 1)
    if need > capacity:
        why = {"blocked": "the layer inputs and one layer's attention scores, which jaxchat's CPU attention keeps "
                          "for the backward",
               "xla": "the layer inputs and one layer's (T, T) attention scores of XLA's attention"}.get(
            run_backend.attention, "the layer inputs kept for the backward")
        raise UserError(f"--max-seq-len={config.sequence_len} cannot fit: even --device-batch-size=1 needs at least "
                        f"{fmt_bytes(need)} per device ({why}), over the {fmt_bytes(capacity)} available ({source}); "
                        f"use a shorter --max-seq-len")


def over_capacity_warning(chosen: StepMemory) -> str | None:
    """A warning line when a fixed device batch is predicted not to fit."""
    if chosen.fits:
        return None
    return (f"warning: --device-batch-size={chosen.device_batch_size} is predicted to need "
            f"{fmt_bytes(chosen.predicted_bytes)} per device, over {SAFETY_MARGIN:.0%} of "
            f"{fmt_bytes(chosen.capacity_bytes)} ({chosen.capacity_source}); expect an out-of-memory error: try "
            f"--device-batch-size={max(1, chosen.device_batch_size // 2)} or auto")


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is XLA running out of device memory."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower())


def oom_message(chosen: StepMemory, step: int, last_checkpoint: int | None) -> str:
    """The one line a user sees instead of an out-of-memory traceback (`chosen`: the step plan_step chose)."""
    smaller = max(1, chosen.device_batch_size // 2)
    saved = (f"the last checkpoint (step {last_checkpoint}) is intact: add --resume-from-step={last_checkpoint}"
             if last_checkpoint is not None else "no checkpoint was saved yet")
    return (f"out of device memory at step {step} with --device-batch-size={chosen.device_batch_size} (predicted "
            f"{fmt_bytes(chosen.predicted_bytes)} per device, {fmt_bytes(chosen.capacity_bytes)} available from "
            f"{chosen.capacity_source}): try --device-batch-size={smaller} or auto (the total batch stays the same); "
            f"{saved}")
