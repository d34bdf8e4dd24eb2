"""The backend decision, made once at set-up from the devices a step is compiled for: compute dtype, attention
kernel, loss head, whether --fp8 runs and whether its matmuls become fp8 GEMMs.

The model and the step receive it as data (`GPT(..., backend=...)`); nothing asks `jax.default_backend()` while
tracing, so a step compiled ahead of time for GPUs or TPUs that are not there (jaxchat.aot) is the one they would run.
"""

import dataclasses
import glob
import importlib.util
import os
import re

import jax

from jaxchat.runtime.common import UserError


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one platform runs; hashable, so it is static data of the model."""

    platform: str  # "cpu", "gpu" or "tpu": of the mesh's devices
    device_kind: str
    compute_dtype: str  # activations and matmuls
    # "blocked" (jaxchat's for XLA:CPU), "cudnn" (cuDNN flash attention), "splash" (Pallas, TPU), "xla" (jax.nn's)
    attention: str
    loss_block_tokens: int  # tokens per block of the fused loss head (loss.fused_mean_cross_entropy)
    fp8_gemms: bool  # XLA turns the fp8 pattern into fp8 GEMMs (CUDA compute capability >= 8.9)
    fp8: bool = False  # --fp8 runs: asked for, and not on TPU
    # Whether the forward pass scans over repeated layers (compile time flat in depth) or unrolls them. On GPU
    # unrolled: XLA:GPU's program for a scanned stack writes every residual the backward pass needs into a zero-filled
    # stacked buffer and copies it out again (19% of the record command's projected step on 8 H100s:
    # docs/performance.md). Scanned on CPU, which compiles in half the time, and on TPU, where nothing has shown the
    # same cost and the scan keeps FSDP's weight gathers one layer at a time.
    scan_layers: bool = True
    # Whether each device sums its own rows' gradients over the micro-batches in a shard_map and the devices' sums are
    # reduced once per step (jaxchat.training.step.gradient_sum), or GSPMD places the reductions. Per device on GPU
    # (XLA:GPU's H100 program under GSPMD all-reduced each layer's weight gradient in every micro-batch: 37.5 GB per GPU
    # and step for the record command, against 7.9 GB) and on CPU; GSPMD on TPU, where XLA:TPU predicts more memory for
    # the per-device step (d12 on v5e-8 at device batch 32: 15.2 GiB, over 90% of the chip's 15.75, against 13.3).
    per_device_gradients: bool = True
    # Whether the norms', lambda mix's and relu^2's own bf16 recomputation (jaxchat.model.gpt.recomputed_when_narrow)
    # keeps jax.checkpoint's optimisation barrier. Not on GPU: there the barrier kept each backward fp8 GEMM's output
    # scaling a pass of its own (the record command on 8 H100s: 1,142 ms projected with it, 1,069 without, peak 55.8
    # and 53.5 GiB); on TPU XLA keeps more without it (tests/test_aot.py's small v5e step: 0.43 -> 0.49 GiB).
    recompute_barrier: bool = True
    # the mesh's abstract mesh (for_mesh): splash attention's shard_map where no mesh is in context (evaluation)
    mesh: jax.sharding.AbstractMesh | None = None
    note: str = ""  # one line for the user where the platform lacks what it would normally use

    def default_dtype(self, flag: str | None) -> str:
        """A dtype flag's value, else the platform's (_platform_dtype)."""
        return flag or _platform_dtype(self.platform)

    def embed_dtype(self, flag: str | None) -> str:
        """--embed-dtype's value, else bfloat16 on GPU (nanochat casts wte and the value embeddings to bf16 on CUDA:
        nanochat/gpt.py GPT.init_weights), float32 elsewhere (as nanochat on CPU)."""
        return flag or ("bfloat16" if self.platform == "gpu" else "float32")


def _platform_dtype(platform: str) -> str:
    """bfloat16 on GPU and TPU (the reference on CUDA), float32 on CPU."""
    return "float32" if platform == "cpu" else "bfloat16"


def _capability(device) -> tuple[int, int] | None:
    """CUDA compute capability (major, minor); None on ROCm or where the device does not say."""
    found = re.fullmatch(r"(\d+)\.(\d+)", str(getattr(device, "compute_capability", "")))
    return tuple(map(int, found.groups())) if found else None


def for_devices(devices, compute_dtype: str | None = None, fp8: bool = False) -> "Backend":
    """The backend of these devices (a mesh's), with --compute-dtype (None: the platform's default) and --fp8."""
    device = list(devices)[0]
    platform = device.platform
    cpu = platform == "cpu"
    dtype = compute_dtype or _platform_dtype(platform)
    capability = _capability(device)
    note = ""
    if cpu:
        attention = "blocked"  # XLA:CPU has no fused attention; jaxchat's blocks skip the invisible keys
    elif platform == "tpu":
        attention = "splash"  # Pallas splash attention: fused softmax, sliding windows skip their empty tiles
    elif platform == "gpu" and capability is not None and capability >= (8, 0) and dtype in ("bfloat16", "float16"):
        attention = "cudnn"  # cuDNN's flash attention (fused softmax, no (T, T) scores in memory)
    else:
        attention = "xla"
        if platform == "gpu":
            why = (f"compute dtype {dtype}" if dtype not in ("bfloat16", "float16")
                   else f"{device.device_kind} has no cuDNN flash attention (needs CUDA compute capability >= 8.0)")
            note = f"attention: XLA's (scores in memory), not cuDNN's: {why}"
    if fp8 and platform == "tpu":
        # nanochat's fp8 recipe (jaxchat.model.fp8) is made for CUDA's fp8 GEMMs with tensorwise scales and is neither
        # fast nor checked on TPU: the run trains in the compute dtype, and says so
        note = f"--fp8: off on TPU ({device.device_kind}): the step runs in {dtype} (nanochat's fp8 recipe is CUDA's)"
        fp8 = False
    return Backend(platform=platform, device_kind=device.device_kind, compute_dtype=dtype, attention=attention,
                   # CPU: measured fastest at V 4096 and 32768 on 2 cores; GPU and TPU: a (8192, 32768) float32
                   # block is 1 GiB, and GEMMs of 8192 rows keep an H100 or a TPU's matrix units busy
                   loss_block_tokens=1024 if cpu else 8192,
                   fp8_gemms=platform == "gpu" and capability is not None and capability >= (8, 9), fp8=fp8,
                   scan_layers=platform != "gpu", per_device_gradients=platform != "tpu",
                   recompute_barrier=platform != "gpu",
                   note=note)


def for_mesh(mesh, compute_dtype: str | None = None, fp8: bool = False) -> "Backend":
    """The backend of a mesh's devices."""
    return dataclasses.replace(for_devices(mesh.devices.flat, compute_dtype, fp8), mesh=mesh.abstract_mesh)


def local(compute_dtype: str | None = None) -> "Backend":
    """The backend of this process's devices (the default for a model built without one)."""
    return for_devices(jax.local_devices(), compute_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Which platforms JAX may start: checked once per command, before anything starts a backend (cli.run)

# Accelerator plugins: {platform: (modules any of which means it is installed, how to install it)}
PLUGINS = {
    "cuda": (("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13", "jax_cuda12_plugin", "jax_cuda13_plugin"),
             "pip install -e '.[cuda12]' (or '.[cuda13]' for CUDA 13)"),
    "rocm": (("jax_plugins.xla_rocm7", "jax_rocm7_plugin", "jax_rocm60_plugin"),
             "install JAX's ROCm plugin (JAX's installation guide names the package for your ROCm)"),
    "tpu": (("libtpu",), "pip install -e '.[tpu]'"),
}
ALIASES = {"gpu": ("cuda", "rocm")}  # JAX_PLATFORMS=gpu: either
# The evidence of each accelerator that JAX's own check reads (jax._src.hardware_utils: NVIDIA device nodes, AMD's
# KFD node, Google's PCI vendor with a TPU device id), plus the device nodes TPU VMs expose (/dev/accel*: v4 and v5p,
# /dev/vfio/N: v5e and later). More evidence errs towards "present", which changes nothing.
DEVICE_NODES = {"cuda": ("dev/nvidia0", "dev/nvidiactl", "dev/dxg", "dev/nvidia[0-9]*"),
                "rocm": ("dev/kfd", "dev/dxg"),
                "tpu": ("dev/accel[0-9]*", "dev/vfio/[0-9]*")}
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")  # v3 ... TPU7x


def installed_plugins() -> set[str]:
    """The accelerator platforms whose JAX plugin is installed (found, not imported)."""
    def found(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that is not there
            return False
    return {platform for platform, (modules, _) in PLUGINS.items() if any(found(m) for m in modules)}


def device_present(platform: str, root: str = "/") -> bool:
    """Whether this machine shows an accelerator of `platform` (its device nodes, or a TPU on the PCI bus), read from
    the files under `root` without starting anything."""
    if any(glob.glob(os.path.join(root, pattern)) for pattern in DEVICE_NODES.get(platform, ())):
        return True
    if platform == "tpu":
        for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
            try:
                with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
                    if f.read().strip() == GOOGLE_PCI_VENDOR and g.read().strip() in TPU_PCI_DEVICES:
                        return True
            except OSError:
                continue
    return False


def platforms_to_use(requested: str, installed: set[str], present) -> str | None:
    """The jax_platforms value to set before the first backend starts, None to leave JAX's choice alone; a
    JAX_PLATFORMS that cannot work is a UserError (one line) instead of JAX's AssertionError or RuntimeError later.

    requested: JAX_PLATFORMS ('' = JAX picks); present(platform): whether the machine shows that accelerator.
    Unset, with accelerator plugins installed and none of their devices here (a CPU machine with the test install),
    only the CPU starts: the CUDA plugin's cuInit traceback and libtpu's TPU_* block are those plugins failing to
    find a device, and JAX falls back to the CPU after them anyway. With any of the devices here nothing is
    changed."""
    if requested.strip():
        for name in (n.strip().lower() for n in requested.split(",")):
            wanted = ALIASES.get(name, (name,))
            if name == "cpu" or not set(wanted) & set(PLUGINS):
                continue  # the CPU, or a name JAX itself will judge (one line: startup_error)
            if not set(wanted) & installed:
                raise UserError(f"JAX_PLATFORMS={requested} asks for {name}, whose JAX plugin is not installed: "
                                f"{PLUGINS[wanted[0]][1]}, or unset JAX_PLATFORMS to use what this machine has")
            if not any(present(p) for p in wanted if p in installed):
                raise UserError(f"JAX_PLATFORMS={requested} asks for {name}, but this machine shows no such device "
                                f"(no {', '.join(dict.fromkeys('/' + n for p in wanted for n in DEVICE_NODES[p]))}"
                                f"{' or TPU on the PCI bus' if 'tpu' in wanted else ''}): unset JAX_PLATFORMS, or "
                                f"set it to cpu")
        return None
    if installed and not any(present(p) for p in installed):
        return "cpu"
    return None


def choose_platforms(compile_only: bool = False) -> None:
    """Once per command, before any backend starts: platforms_to_use for this machine, applied. compile_only: the
    command compiles for devices that are not here (jaxchat.aot), so with JAX_PLATFORMS unset only the CPU starts
    (a GPU host's GPUs included)."""
    requested = os.environ.get("JAX_PLATFORMS", "")
    use = platforms_to_use(requested, installed_plugins(), device_present)
    if compile_only and not requested.strip():
        use = "cpu"
    if use is not None:
        jax.config.update("jax_platforms", use)


def startup_error(exc: BaseException) -> str | None:
    """JAX failing to start a backend that JAX_PLATFORMS names (one that platforms_to_use cannot judge: an unknown
    name, a driver that fails), as one line; None for any other error."""
    text = str(exc).strip()
    if isinstance(exc, RuntimeError) and text.startswith("Unable to initialize backend"):
        first = text.splitlines()[0].split(" (set JAX_PLATFORMS=")[0].split(" (you may need")[0].rstrip(".")
        return (f"{first}: set JAX_PLATFORMS to a platform this machine has (cpu, cuda, tpu), or unset it "
                f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r})")
    return None
