"""The attention kernels of jaxchat.attention against jax.nn's: jaxchat's blocked CPU attention, and on TPU splash
attention (run here in Pallas interpret mode): outputs and gradients."""

import jax
import numpy as np
import pytest

from jaxchat.attention import attention


@pytest.mark.parametrize("T, window, kv_heads", [(32, 32, 2), (30, 12, 2), (21, 5, 1)])
@pytest.mark.parametrize("use_jit", [False, True])
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
