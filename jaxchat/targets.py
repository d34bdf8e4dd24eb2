"""GPU targets to compile for without the GPU (jaxchat.aot): each one's device description as data, rendered as the
`stream_executor.GpuTargetConfigProto` text that `jax.experimental.topologies.get_topology_desc` takes.

The fields are those of XLA's published target configs (openxla/xla `xla/tools/hlo_opt/gpu_specs`) and the vendors'
data sheets; `memory_bytes` is what the CUDA runtime reports as the device's total memory. The cuDNN and CUDA versions
are those the CUDA 12 plugin wheels ship (cuDNN's fused attention is checked against them).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One GPU model, as XLA's GPU compiler sees it."""

    device_kind: str  # what `jax.devices()[0].device_kind` says on the real device (monitor.peak_flops keys on it)
    capability: tuple[int, int]  # CUDA compute capability
    sms: int  # streaming multiprocessors (core_count)
    fpus_per_sm: int
    memory_bytes: int
    bandwidth: int  # bytes/s
    l2_bytes: int
    clock_ghz: float
    shared_per_sm: int
    shared_per_block_optin: int

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


_HOPPER = dict(capability=(9, 0), sms=132, fpus_per_sm=128, l2_bytes=50 * 2**20, clock_ghz=1.98,
               shared_per_sm=233472, shared_per_block_optin=232448)

GPU_TARGETS = {
    "h100": GpuTarget(device_kind="NVIDIA H100 80GB HBM3", memory_bytes=84_978_434_048, bandwidth=3_352_320_000_000,
                      **_HOPPER),
    "h200": GpuTarget(device_kind="NVIDIA H200", memory_bytes=150_754_820_096, bandwidth=4_800_000_000_000, **_HOPPER),
    "a100": GpuTarget(device_kind="NVIDIA A100-SXM4-80GB", capability=(8, 0), sms=108, fpus_per_sm=64,
                      memory_bytes=85_097_971_712, bandwidth=2_039_000_000_000, l2_bytes=40 * 2**20, clock_ghz=1.41,
                      shared_per_sm=167936, shared_per_block_optin=166912),
}
