"""Attention kernels and their dispatch (as nanochat's flash_attention.py beside gpt.py): causal attention with a
left window, by the kernel the backend names (jaxchat.backend.ATTENTION), and one query against a KV cache.

    y_BTHD = attention(q_BTHD, k_BTKD, v_BTKD, window_left, impl=backend.attention)
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat import mesh as meshlib


def attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, window_left: int, impl: str) -> jax.Array:
    """Causal attention where query t sees keys t-window_left..t, by the backend's kernel (backend.ATTENTION):
    "blocked" (jaxchat's, for XLA:CPU), "cudnn" (cuDNN flash attention) or "xla" (jax.nn's XLA path)."""
    if impl == "blocked":
        groups = q_BTHD.shape[2] // k_BTKD.shape[2]  # GQA: each kv head serves `groups` query heads
        k_BTHD, v_BTHD = (jnp.repeat(t, groups, axis=2) if groups > 1 else t for t in (k_BTKD, v_BTKD))
        with jax.named_scope("blocked_attention"):  # named in the compiled program: jaxchat.aot looks for it
            return blocked_attention(q_BTHD, k_BTHD, v_BTHD, window_left)
    seq_len = q_BTHD.shape[1]
    local = None if window_left >= seq_len else (window_left, 0)  # plain causal is the fastest kernel
    q_BTHD, k_BTKD, v_BTKD = (meshlib.split_by_rows(t) for t in (q_BTHD, k_BTKD, v_BTKD))
    return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=True, local_window_size=local,
                                        implementation=impl)


ATTENTION_BLOCKS = 4  # query blocks of blocked_attention: measured fastest at T 256 and 512 on a 2-core CPU


def _attention_blocks(T: int, window_left: int) -> list[tuple[int, int, int, np.ndarray]]:
    """Per query block: (first query, end, first key it can see, visibility mask (queries, keys))."""
    size = -(-T // ATTENTION_BLOCKS)
    blocks = []
    for t0 in range(0, T, size):
        t1, s0 = min(T, t0 + size), max(0, t0 - window_left)
        q_pos, k_pos = np.arange(t0, t1)[:, None], np.arange(s0, t1)[None, :]
        blocks.append((t0, t1, s0, (k_pos <= q_pos) & (k_pos >= q_pos - window_left)))
    return blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def blocked_attention(q_BTHD: jax.Array, k_BTHD: jax.Array, v_BTHD: jax.Array, window_left: int) -> jax.Array:
    """Attention (one kv head per query head) computed per block of queries against only the keys the block can see.

    XLA:CPU has no fused attention: jax.nn.dot_product_attention's XLA path materialises and masks every (query, key)
    score, and its backward reduces over them again. Here the keys after a block (and left of its window) are never
    scored, and the backward is flash attention's: dS = P * (dP - rowsum(dO * O)), a reduction over the head
    dimension instead of the keys. Scores, softmax and its gradient in float32, as jax.nn's.
    """
    return _blocked_attention_fwd(q_BTHD, k_BTHD, v_BTHD, window_left)[0]


def _blocked_attention_fwd(q_BTHD, k_BTHD, v_BTHD, window_left):
    q_BHTD, k_BHTD, v_BHTD = (t.transpose(0, 2, 1, 3) for t in (q_BTHD, k_BTHD, v_BTHD))
    scale = 1 / math.sqrt(q_BTHD.shape[-1])
    outs, probs = [], []
    for t0, t1, s0, visible in _attention_blocks(q_BTHD.shape[1], window_left):
        s_BHts = jnp.einsum("bhtd,bhsd->bhts", q_BHTD[:, :, t0:t1], k_BHTD[:, :, s0:t1],
                            preferred_element_type=jnp.float32) * scale
        p_BHts = jax.nn.softmax(jnp.where(visible, s_BHts, -jnp.inf), axis=-1)
        probs.append(p_BHts)
        outs.append(jnp.einsum("bhts,bhsd->bhtd", p_BHts.astype(v_BHTD.dtype), v_BHTD[:, :, s0:t1]))
    o_BHTD = jnp.concatenate(outs, axis=2)
    return o_BHTD.transpose(0, 2, 1, 3), (q_BHTD, k_BHTD, v_BHTD, o_BHTD, probs)


def _blocked_attention_bwd(window_left, residuals, g_BTHD):
    q_BHTD, k_BHTD, v_BHTD, o_BHTD, probs = residuals
    g_BHTD = g_BTHD.transpose(0, 2, 1, 3)
    scale = 1 / math.sqrt(q_BHTD.shape[-1])
    delta_BHT = jnp.sum(g_BHTD.astype(jnp.float32) * o_BHTD.astype(jnp.float32), axis=-1)
    dq, dk_BHTD, dv_BHTD = [], jnp.zeros(k_BHTD.shape, jnp.float32), jnp.zeros(v_BHTD.shape, jnp.float32)
    for (t0, t1, s0, _), p_BHts in zip(_attention_blocks(q_BHTD.shape[2], window_left), probs):
        g_BHtD = g_BHTD[:, :, t0:t1]
        dv_BHTD = dv_BHTD.at[:, :, s0:t1].add(jnp.einsum("bhts,bhtd->bhsd", p_BHts.astype(g_BHtD.dtype), g_BHtD,
                                                         preferred_element_type=jnp.float32))
        dp_BHts = jnp.einsum("bhtd,bhsd->bhts", g_BHtD, v_BHTD[:, :, s0:t1], preferred_element_type=jnp.float32)
        ds_BHts = (p_BHts * (dp_BHts - delta_BHT[:, :, t0:t1, None]) * scale).astype(q_BHTD.dtype)
        dq.append(jnp.einsum("bhts,bhsd->bhtd", ds_BHts, k_BHTD[:, :, s0:t1]))
        dk_BHTD = dk_BHTD.at[:, :, s0:t1].add(jnp.einsum("bhts,bhtd->bhsd", ds_BHts, q_BHTD[:, :, t0:t1],
                                                         preferred_element_type=jnp.float32))
    dq_BHTD = jnp.concatenate(dq, axis=2)
    return tuple(t.astype(q_BHTD.dtype).transpose(0, 2, 1, 3) for t in (dq_BHTD, dk_BHTD, dv_BHTD))


blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def cached_attention(q_B1HD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, pos: jax.Array,
                     window_left: int) -> jax.Array:
    """One query at position `pos` against a KV cache: keys pos-window_left..pos are visible."""
    B, _, H, D = q_B1HD.shape
    K = k_BSKD.shape[2]
    q = q_B1HD.reshape(B, K, H // K, D)  # GQA: query heads grouped by their kv head
    scores_BKGS = jnp.einsum("bkgd,bskd->bkgs", q, k_BSKD).astype(jnp.float32) / math.sqrt(D)
    key_pos = jnp.arange(k_BSKD.shape[1])
    visible = (key_pos <= pos) & (key_pos >= pos - window_left)
    probs = jax.nn.softmax(jnp.where(visible, scores_BKGS, -jnp.inf), axis=-1).astype(v_BSKD.dtype)
    return jnp.einsum("bkgs,bskd->bkgd", probs, v_BSKD).reshape(B, 1, H, D)


def kernel_outputs(prim, *_, **__) -> bool:
    """Whether a primitive is cuDNN flash attention's forward (its output and softmax statistics: what its backward
    reads), so that a policy keeping it does not run the attention forward twice."""
    return prim.name.startswith("dot_product_attention_fwd")
