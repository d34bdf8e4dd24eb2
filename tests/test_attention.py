"""The attention kernels of jaxchat.model.attention against jax.nn's: jaxchat's blocked CPU attention, and on TPU splash
attention (run here in Pallas interpret mode): outputs and gradients."""

import jax
import numpy as np
import pytest

from jaxchat.model.attention import attention


@pytest.mark.parametrize("T, window, kv_heads", [(32, 32, 2), (30, 12, 2), (21, 5, 1)])
@pytest.mark.parametrize("use_jit", [pytest.param(False, marks=pytest.mark.slow), True])  # eager: slow dispatches
def test_cpu_attention_equals_jax_dot_product_attention(T, window, kv_heads, use_jit):
    """The blocked CPU kernel (flash-style backward; T not divisible by the blocks, windows, GQA) gives
    jax.nn.dot_product_attention's outputs and input gradients."""
    q, k, v, g = (jax.random.normal(key, (2, T, n, 16)) for key, n in zip(jax.random.split(jax.random.key(0), 4),
                                                                           (4, kv_heads, kv_heads, 4)))
    local = None if window >= T else (window, 0)

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation="xla")

    def ours(q, k, v):
        return attention(q, k, v, window, "blocked")

    results = []
    for fn in (reference, ours):
        out, vjp = jax.vjp(jax.jit(fn) if use_jit else fn, q, k, v)
        results.append((out, *vjp(g)))
    for want, got in zip(*results):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


# full causal; a short window with GQA
@pytest.mark.parametrize("window, kv_heads", [pytest.param(128, 2, marks=pytest.mark.slow), (50, 1)])
def test_splash_attention_equals_cpu_attention_in_interpret_mode(window, kv_heads):
    """TPU's splash attention, run by Pallas's interpreter on CPU inside its shard_map over a 2-device data mesh (as
    the train step runs it), gives jaxchat's CPU attention's outputs and input gradients in float32."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxchat.model import mesh as meshlib
    from jaxchat.model.attention import splash_attention
    T, heads = 128, 2  # the smallest length splash tiles (its lanes are 128 wide)
    q, k, v, g = (jax.random.normal(key, (2, T, n, 16)) for key, n in zip(jax.random.split(jax.random.key(1), 4),
                                                                           (heads, kv_heads, kv_heads, heads)))
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, window, "blocked"), q, k, v)
    want = (out, *vjp(g))
    mesh = meshlib.make_mesh(1, devices=jax.devices()[:2])
    q, k, v, g = (jax.device_put(t, NamedSharding(mesh, P("data"))) for t in (q, k, v, g))

    def splash(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return splash_attention(q, k, v, window, interpret=True)

    assert "shard_map" in jax.jit(splash).trace(q, k, v).jaxpr.pretty_print()
    out, vjp = jax.vjp(jax.jit(splash), q, k, v)
    for name, w, got in zip(("out", "dq", "dk", "dv"), want, (out, *vjp(g))):
        np.testing.assert_allclose(got, w, atol=5e-6, rtol=1e-5, err_msg=name)
