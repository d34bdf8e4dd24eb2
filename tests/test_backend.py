"""The backend decision: made from the devices, passed to the model as data, never asked of JAX while tracing."""

import dataclasses
from types import SimpleNamespace as Device

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat.model.gpt import GPT, GPTConfig
from jaxchat.runtime import backend

TINY = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="SL")


def gpu(capability: str, kind: str = "GPU") -> Device:
    return Device(platform="gpu", compute_capability=capability, device_kind=kind)


@pytest.mark.parametrize("device, dtype, attention, fp8, note", [
    (Device(platform="cpu", device_kind="cpu"), None, "blocked", False, ""),
    (gpu("9.0", "NVIDIA H100 80GB HBM3"), None, "cudnn", True, ""),
    (gpu("8.0", "NVIDIA A100-SXM4-80GB"), None, "cudnn", False, ""),
    (gpu("7.0", "Tesla V100-SXM2-32GB"), None, "xla", False, "Tesla V100-SXM2-32GB has no cuDNN flash attention"),
    (gpu("gfx942", "AMD Instinct MI300X"), None, "xla", False, "MI300X has no cuDNN flash attention"),
    (gpu("9.0"), "float32", "xla", True, "compute dtype float32"),
    (Device(platform="tpu", device_kind="TPU v5 lite"), None, "splash", False, ""),
])
def test_backend_of_devices(device, dtype, attention, fp8, note):
    """cuDNN attention where it exists and the step is bf16; XLA's with one line elsewhere on GPU; splash attention
    and bf16 on TPU; jaxchat's blocked attention and float32 on CPU; fp8 GEMMs from compute capability 8.9; layers
    unrolled and the narrow recomputation without its barrier on GPU only, gradients reduced by GSPMD on TPU only
    (Backend's comments say why)."""
    b = backend.for_devices([device], dtype)
    assert not b.fp8  # only where --fp8 asks for it
    gpu, tpu = device.platform == "gpu", device.platform == "tpu"
    assert (b.scan_layers, b.per_device_gradients, b.recompute_barrier) == (not gpu, not tpu, not gpu)
    assert b.loss_block_tokens == (1024 if device.platform == "cpu" else 8192)
    assert (b.attention, b.fp8_gemms) == (attention, fp8)
    assert (note in b.note) if note else b.note == ""
    assert b.compute_dtype == (dtype or ("float32" if device.platform == "cpu" else "bfloat16"))
    assert b.default_dtype("") == ("float32" if device.platform == "cpu" else "bfloat16")
    assert b.default_dtype("float32") == "float32"


def test_fp8_is_off_on_tpu_with_one_line():
    """--fp8 on TPU: the run trains without it and says so in one line; on an H100 it runs, with no note."""
    tpu = backend.for_devices([Device(platform="tpu", device_kind="TPU v6 lite")], fp8=True)
    assert not tpu.fp8 and tpu.note.startswith("--fp8: off on TPU (TPU v6 lite)") and "\n" not in tpu.note
    h100 = backend.for_devices([gpu("9.0", "NVIDIA H100 80GB HBM3")], fp8=True)
    assert h100.fp8 and h100.note == ""


@pytest.mark.slow
def test_model_follows_its_backend_not_jax_default_backend(monkeypatch):
    """The model traces the attention its backend names: a jax.default_backend() that says "gpu" changes nothing, and
    the XLA attention (what an older GPU or a TPU gets) gives the blocked CPU attention's loss and gradients."""
    idx = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    cpu = backend.for_devices(jax.devices())

    def loss_and_grads(model_backend):
        model = GPT(TINY, rngs=nnx.Rngs(0), backend=model_backend)
        graphdef, params = nnx.split(model)
        fn = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(idx, idx)))
        return fn.lower(params).as_text(debug_info=True), fn(params)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    blocked_text, (blocked_loss, blocked_grads) = loss_and_grads(cpu)
    assert "blocked_attention" in blocked_text
    xla_text, (xla_loss, xla_grads) = loss_and_grads(dataclasses.replace(cpu, attention="xla"))
    assert "blocked_attention" not in xla_text
    np.testing.assert_allclose(xla_loss, blocked_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(xla_grads), jax.tree.leaves(blocked_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert jnp.isfinite(xla_loss)


# ------------------------------------------------------------------------------------------------------------------
# Which platforms JAX may start (backend.platforms_to_use, called once per command by cli.run)

def fake_machine(root, *nodes, pci=()):
    """A file tree with the device nodes and PCI (vendor, device) ids that backend.device_present reads."""
    for node in nodes:
        (root / node).parent.mkdir(parents=True, exist_ok=True)
        (root / node).write_text("")
    for i, (vendor, device) in enumerate(pci):
        d = root / "sys/bus/pci/devices" / f"0000:00:0{i}.0"
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
    return lambda platform: backend.device_present(platform, str(root))


@pytest.mark.parametrize("nodes, pci, expected", [
    ((), (), "cpu"),  # the test install on a CPU machine: only the CPU starts, quietly
    ((), (("0x1ae0", "0x0042"),), "cpu"),  # a GCE VM's gVNIC is Google's PCI vendor but no TPU
    (("dev/nvidiactl",), (), None), (("dev/nvidia0",), (), None), (("dev/dxg",), (), None),  # a GPU: JAX's choice
    (("dev/accel0",), (), None), (("dev/vfio/0",), (), None), ((), (("0x1ae0", "0x0063"),), None),  # a TPU
])
def test_installed_plugins_start_only_where_their_device_is(tmp_path, nodes, pci, expected):
    """A CPU machine with the cuda12 and tpu plugins installed printed the CUDA plugin's cuInit traceback and
    libtpu's TPU_* block in every command: with none of their devices here, only the CPU starts. With a device (the
    nodes and PCI ids JAX's own check reads, faked here) nothing changes."""
    present = fake_machine(tmp_path, *nodes, pci=pci)
    assert backend.platforms_to_use("", {"cuda", "tpu"}, present) == expected
    assert backend.platforms_to_use("", set(), present) is None  # no accelerator plugin: nothing to silence


def test_jax_platforms_that_cannot_work_is_one_line(tmp_path):
    """JAX_PLATFORMS=cuda without the plugin was a bare AssertionError from jax.devices(): one line with the
    install command; with the plugin but no device, one line saying so; a platform that is here is left to JAX."""
    from jaxchat.runtime.common import UserError

    empty, gpu_here = fake_machine(tmp_path / "a"), fake_machine(tmp_path / "b", "dev/nvidiactl")
    with pytest.raises(UserError, match=r"^JAX_PLATFORMS=cuda asks for cuda, whose JAX plugin is not installed: "
                                        r"pip install -e '\.\[cuda12\]'"):
        backend.platforms_to_use("cuda", {"tpu"}, gpu_here)
    with pytest.raises(UserError, match=r"^JAX_PLATFORMS=tpu asks for tpu, whose JAX plugin is not installed: "
                                        r"pip install -e '\.\[tpu\]'"):
        backend.platforms_to_use("tpu", set(), empty)
    with pytest.raises(UserError, match=r"^JAX_PLATFORMS=cpu,cuda asks for cuda, but this machine shows no such "
                                        r"device \(no /dev/nvidia0, .*\): unset JAX_PLATFORMS, or set it to cpu$"):
        backend.platforms_to_use("cpu,cuda", {"cuda"}, empty)
    with pytest.raises(UserError, match="JAX_PLATFORMS=gpu asks for gpu, whose JAX plugin is not installed"):
        backend.platforms_to_use("gpu", set(), gpu_here)
    for requested in ("cuda", "gpu", "cuda,cpu", "cpu", "bogus"):  # the device is here, or JAX judges the name
        assert backend.platforms_to_use(requested, {"cuda", "tpu"}, gpu_here) is None


def _run(code: str, **env) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys
    from pathlib import Path

    environ = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | env
    environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-c", f"import jax\nfrom jaxchat.runtime import cli\n{code}"],
                          env=environ, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_commands_start_jax_quietly_or_say_in_one_line_why_not():
    """Through cli.run, as every command starts: JAX_PLATFORMS naming an unknown platform is JAX's error in
    one line (exit 2); where no accelerator is here, cuda is one line and an unset JAX_PLATFORMS starts the CPU with
    nothing on stderr, whatever plugins are installed."""
    r = _run("cli.run(jax.devices)", JAX_PLATFORMS="bogus")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Unable to initialize backend 'bogus'" in r.stderr, \
        r.stderr
    if any(backend.device_present(p) for p in backend.PLUGINS):
        pytest.skip("an accelerator is here: the CPU-only cases do not apply")
    r = _run("cli.run(jax.devices)", JAX_PLATFORMS="cuda")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "JAX_PLATFORMS=cuda asks for cuda" in r.stderr, r.stderr
    r = _run("cli.run(lambda: print(jax.devices()))")
    assert r.returncode == 0 and r.stderr == "" and "CpuDevice" in r.stdout, r.stderr


def test_nothing_asks_jax_default_backend():
    """The backend is decided once (Backend, from the devices); core_eval's CORE bucket size asked
    jax.default_backend() beside it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "jaxchat"
    calls = [f"{p.name}:{node.lineno}" for p in sorted(root.rglob("*.py")) for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == "default_backend"]
    assert not calls, calls
