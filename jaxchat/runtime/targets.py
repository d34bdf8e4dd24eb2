"""GPU and TPU targets to compile for without the device (jaxchat.aot), as data. A GPU: its device description,
rendered as the `stream_executor.GpuTargetConfigProto` text that `jax.experimental.topologies.get_topology_desc`
takes. A TPU: libtpu's name of the generation and slice shapes, usable HBM and peak bf16 FLOP/s per chip.

The fields are those of XLA's published target configs (openxla/xla `xla/tools/hlo_opt/gpu_specs`) and the vendors'
data sheets; `memory_bytes` is what the CUDA runtime reports as the device's total memory. The cuDNN and CUDA versions
are those the CUDA 12 plugin wheels ship (cuDNN's fused attention is checked against them).
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One GPU model, as XLA's GPU compiler sees it."""

    device_kind: str  # what `jax.devices()[0].device_kind` says on the real device (peak_flops below keys on it)
    capability: tuple[int, int]  # CUDA compute capability
    sms: int  # streaming multiprocessors (core_count)
    fpus_per_sm: int
    memory_bytes: int
    bandwidth: int  # bytes/s
    l2_bytes: int
    clock_ghz: float
    shared_per_sm: int
    shared_per_block_optin: int
    # Roofline figures (jaxchat.training.projection), the vendor's data sheet per GPU: dense fp8 tensor-core FLOP/s (no
    # sparsity) and NVLink bytes/s per direction per GPU; `bandwidth` above is the HBM's, bf16_flops is PEAK_FLOPS's
    fp8_flops: float | None = None  # None: no fp8 tensor cores (A100)
    interconnect: float = 0.0

    @property
    def bf16_flops(self) -> float:
        """Peak dense bf16 FLOP/s: the one table MFU uses (PEAK_FLOPS)."""
        return peak_flops(self.device_kind)

    def proto_text(self) -> str:
        """The GpuTargetConfigProto in text form."""
        major, minor = self.capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_per_sm}
  threads_per_core_limit: 2048
  core_count: {self.sms}
  fpus_per_core: {self.fpus_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.bandwidth}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{self.device_kind}"
"""


# H100 SXM and H200 data sheets: 989 TFLOP/s dense bf16, 1979 fp8; NVLink 4, 900 GB/s per GPU (450 each way)
_HOPPER = dict(capability=(9, 0), sms=132, fpus_per_sm=128, l2_bytes=50 * 2**20, clock_ghz=1.98,
               shared_per_sm=233472, shared_per_block_optin=232448, fp8_flops=1979e12,
               interconnect=450e9)

GPU_TARGETS = {
    "h100": GpuTarget(device_kind="NVIDIA H100 80GB HBM3", memory_bytes=84_978_434_048, bandwidth=3_352_320_000_000,
                      **_HOPPER),
    "h200": GpuTarget(device_kind="NVIDIA H200", memory_bytes=150_754_820_096, bandwidth=4_800_000_000_000, **_HOPPER),
    "a100": GpuTarget(device_kind="NVIDIA A100-SXM4-80GB", capability=(8, 0), sms=108, fpus_per_sm=64,
                      memory_bytes=85_097_971_712, bandwidth=2_039_000_000_000, l2_bytes=40 * 2**20, clock_ghz=1.41,
                      shared_per_sm=167936, shared_per_block_optin=166912,
                      # A100 SXM data sheet: 312 TFLOP/s dense bf16, no fp8; NVLink 3, 600 GB/s (300 each way)
                      fp8_flops=None, interconnect=300e9),
}


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """The fractions of a GPU's peaks that jaxchat.training.projection assumes its kernels reach: assumptions, not
    measurements (no GPU here); change them here to see what a projection rests on."""

    gemm_bf16: float = 0.70  # cuBLASLt bf16 GEMMs of thousands a side reach 65-75% of the dense peak
    gemm_fp8: float = 0.55  # fp8 GEMMs reach less of their (2x) peak: scaling epilogues, fp32 promotion
    attention_fwd: float = 0.55  # cuDNN flash attention forward, of the bf16 peak, on the (query, key) pairs kept
    attention_bwd: float = 0.40  # its backward (five GEMMs per tile, atomics/recomputation)
    hbm: float = 0.80  # memory-bound kernels: streaming reads and writes reach ~80% of the HBM's bandwidth
    interconnect: float = 0.75  # NCCL ring collectives of MBs to GBs: ~75% of NVLink's per-direction bandwidth
    launch_s: float = 2e-6  # per kernel: the gap between kernels in XLA's command buffers (CUDA graphs)


GPU_EFFICIENCY = Efficiency()


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """One TPU generation: its chips as libtpu's compiler describes them, and the figures planning and MFU use."""

    device_kind: str  # what `jax.devices()[0].device_kind` says on the real chip (peak_flops below keys on it)
    topology: str  # libtpu's name of the generation in topology names ("v5e" in "v5e:2x4")
    dims: int  # the torus: 2 (v5e, v6e) or 3 (v4, v5p)
    one_host_chips: int  # the most chips one TPU VM has (a one-host slice); slices over several hosts have 4 per host
    hbm_bytes: int  # per chip
    usable_bytes: int | None  # what XLA:TPU may allocate per chip (its out-of-memory refusal names it); None: unknown
    bf16_flops: float  # peak dense bf16 FLOP/s per chip

    def topology_name(self, chips: int) -> str:
        """libtpu's topology of a slice of `chips` (a power of two): the torus grows by doubling its smallest side
        (ties: the last), from 1x1 (2D) or 2x2x1 (3D): v5e:2x4, v6e:4x4, v5p:2x2x2, v5p:2x4x4, ..."""
        shape = [1, 1] if self.dims == 2 else [2, 2, 1]
        while math.prod(shape) < chips:
            smallest = min(shape)
            shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
        return f"{self.topology}:{'x'.join(map(str, shape))}"

    def default_hosts(self, chips: int) -> int:
        """The hosts of a slice of `chips`: one where one VM holds them all, else 4 chips per host."""
        return 1 if chips <= self.one_host_chips else chips // MULTI_HOST_CHIPS


MULTI_HOST_CHIPS = 4  # chips per TPU VM in a slice over several hosts (v4, v5e, v5p, v6e)
HOST_BOUNDS = {8: (2, 4, 1), 4: (2, 2, 1), 2: (1, 2, 1), 1: (1, 1, 1)}  # one host's chips: libtpu's chips_per_host_bounds


# Usable HBM: the "available HBM" XLA:TPU reports when it refuses a program (libtpu with jax 0.10.2): 15.75G on v5e,
# 31.25G on v6e, 95.74G on v5p. libtpu's compile-only v4 chips are two devices of 15.25G each (no megacore), not the
# one device of a v4 VM, so v4 is not compiled for (its usable memory as one device is unknown here).
# Peak bf16: the vendor's figures per chip.
_GiB = 2**30
TPU_TARGETS = {
    "v5e": TpuTarget(device_kind="TPU v5 lite", topology="v5e", dims=2, one_host_chips=8, hbm_bytes=16 * _GiB,
                     usable_bytes=int(15.75 * _GiB), bf16_flops=197e12),
    "v6e": TpuTarget(device_kind="TPU v6 lite", topology="v6e", dims=2, one_host_chips=8, hbm_bytes=32 * _GiB,
                     usable_bytes=int(31.25 * _GiB), bf16_flops=918e12),
    "v5p": TpuTarget(device_kind="TPU v5", topology="v5p", dims=3, one_host_chips=4, hbm_bytes=95 * _GiB,
                     usable_bytes=int(95.74 * _GiB), bf16_flops=459e12),
    "v4": TpuTarget(device_kind="TPU v4", topology="v4", dims=3, one_host_chips=4, hbm_bytes=32 * _GiB,
                    usable_bytes=None, bf16_flops=275e12),
}


# Peak dense bf16 FLOP/s per device (nanochat/common.py get_peak_flops at 348fbb3, and TPUs); substring match on the
# lower-cased device kind, first match wins.
PEAK_FLOPS = (
    ("gb200", 2.5e15), ("grace blackwell", 2.5e15), ("b200", 2.25e15), ("b100", 1.8e15),
    ("h200 nvl", 836e12), ("h200 pcie", 836e12), ("h200", 989e12),
    ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989e12),
    ("h800 nvl", 989e12), ("h800", 756e12), ("a100", 312e12), ("a800", 312e12), ("a40", 149.7e12), ("a30", 165e12),
    ("l40s", 362e12), ("l4", 121e12), ("mi355", 2.5e15), ("mi325", 1.3074e15), ("mi300x", 1.3074e15),
    ("mi300a", 980.6e12), ("mi250x", 383e12), ("mi250", 362.1e12), ("rtx 5090", 209.5e12), ("4090", 165.2e12),
    ("3090", 71e12),
    # TPUs: each chip's bf16 peak (TPU_TARGETS above), longer device kinds first ("tpu v5 lite" before "tpu v5")
    *sorted(((t.device_kind.lower(), t.bf16_flops) for t in TPU_TARGETS.values()), key=lambda e: -len(e[0])),
)


def peak_flops(device_kind: str) -> float:
    """Peak bf16 FLOP/s of one device; inf (so MFU reads 0) for CPUs and unknown devices."""
    kind = device_kind.lower()
    return next((flops for name, flops in PEAK_FLOPS if name in kind), math.inf)
