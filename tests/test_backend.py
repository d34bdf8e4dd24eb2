"""The backend decision: made from the devices, passed to the model as data, never asked of JAX while tracing."""

import dataclasses
from types import SimpleNamespace as Device

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat import backend
from jaxchat.model import GPT, GPTConfig

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
    and bf16 on TPU; jaxchat's blocked attention and float32 on CPU; fp8 GEMMs from compute capability 8.9."""
    b = backend.for_devices([device], dtype)
    assert b.fused_loss and not b.fp8
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
