"""Attention kernels and their dispatch (as nanochat's flash_attention.py beside gpt.py): causal attention with a
left window, by the kernel the backend names (Backend.attention), and one query against a KV cache.

    y_BTHD = attention(q_BTHD, k_BTKD, v_BTKD, window_left, impl=backend.attention)

"blocked": jaxchat's, for XLA:CPU; "cudnn": cuDNN flash attention (jax.nn); "splash": JAX's Pallas splash attention
for TPU; "xla": jax.nn's XLA path (the scores in memory), where there is no fused kernel.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from jaxchat.model import mesh as meshlib


def attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, window_left: int, impl: str,
              mesh: jax.sharding.AbstractMesh | None = None) -> jax.Array:
    """Causal attention where query t sees keys t-window_left..t, by the backend's kernel (Backend.attention);
    `mesh`: the one the batch is split over (Backend.mesh; None: the ambient mesh)."""
    if impl == "blocked":
        groups = q_BTHD.shape[2] // k_BTKD.shape[2]  # GQA: each kv head serves `groups` query heads
        k_BTHD, v_BTHD = (jnp.repeat(t, groups, axis=2) if groups > 1 else t for t in (k_BTKD, v_BTKD))
        with jax.named_scope("blocked_attention"):  # named in the compiled program: jaxchat.aot looks for it
            return blocked_attention(q_BTHD, k_BTHD, v_BTHD, window_left)
    seq_len = q_BTHD.shape[1]
    if impl == "splash" and splash_block(seq_len):
        return splash_attention(q_BTHD, k_BTKD, v_BTKD, window_left, mesh=mesh)
    # cuDNN's, or XLA's: where there is no fused kernel, and on TPU for a length splash does not tile (evaluation's
    # short batches: CORE's length buckets)
    impl = "xla" if impl == "splash" else impl
    local = None if window_left >= seq_len else (window_left, 0)  # plain causal is the fastest kernel
    q_BTHD, k_BTKD, v_BTKD = (meshlib.split_by_rows(t) for t in (q_BTHD, k_BTKD, v_BTKD))
    return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=True, local_window_size=local,
                                        implementation=impl)


# ----------------------------------------------------------------------------------------------------------------
# Splash attention (TPU)

SPLASH_BLOCKS = (512, 256, 128)  # query and key tiles, largest first: the Pallas kernel's lanes are 128 wide
SPLASH_RESIDUALS = "splash_residuals"  # checkpoint name of splash's output and log-sum-exp (kept by --remat=dots)


def splash_block(seq_len: int) -> int:
    """The splash tile for this sequence length: the largest of SPLASH_BLOCKS that divides it (0: none does)."""
    return next((b for b in SPLASH_BLOCKS if seq_len % b == 0), 0)


@functools.lru_cache(maxsize=16)
def _splash_kernel(seq_len: int, heads: int, window_left: int, interpret: bool):
    """The splash kernel of one (T, heads, window): made once per shape, as its block masks are computed in numpy."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    shape = (seq_len, seq_len)
    mask = (splash.CausalMask(shape) if window_left >= seq_len
            else splash.LocalMask(shape, window_size=(window_left, 0), offset=0))
    b = splash_block(seq_len)
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                               block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, residual_checkpoint_name=SPLASH_RESIDUALS, interpret=interpret)


def splash_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, window_left: int,
                     interpret: bool = False, mesh: jax.sharding.AbstractMesh | None = None) -> jax.Array:
    """JAX's Pallas splash attention (TPU; `interpret`: run the kernel as plain JAX ops, on any backend).

    The kernel takes one example's (heads, T, head_dim) and does not scale the logits: q is scaled by 1/sqrt(D) first
    (in float32, rounded once), and the kernel is vmapped over the batch. XLA cannot partition a Mosaic call, so
    under a mesh (`mesh`, else the ambient one: the train step sets it, evaluation does not) it runs in a shard_map
    over the axes that split the batch: each device attends its own rows, whole. GQA: the kernel maps each group of
    query heads to its kv head itself."""
    _, T, H, D = q_BTHD.shape
    kernel = jax.vmap(_splash_kernel(T, H, window_left, interpret))
    q_BTHD = (q_BTHD.astype(jnp.float32) * (1 / math.sqrt(D))).astype(q_BTHD.dtype)
    q_BHTD, k_BKTD, v_BKTD = (t.transpose(0, 2, 1, 3) for t in (q_BTHD, k_BTKD, v_BTKD))
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    axes = meshlib.data_shard_axes(mesh)
    if axes:
        # manual over every mesh axis (the rows split over `axes`): Mosaic refuses a call left partly to GSPMD
        kernel = jax.shard_map(kernel, mesh=mesh, in_specs=P(axes), out_specs=P(axes), check_vma=False)
    return kernel(q_BHTD, k_BKTD, v_BKTD).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------------------------------------------
# jaxchat's attention for XLA:CPU

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


def kernel_outputs(prim, *_, **params) -> bool:
    """Whether a primitive is an attention kernel's forward output, what its backward reads (cuDNN's output and
    softmax statistics; splash's output and log-sum-exp, by their checkpoint name), so that a remat policy keeping it
    does not run the attention forward twice."""
    return (prim.name.startswith("dot_product_attention_fwd")
            or (prim.name == "name" and params.get("name") == SPLASH_RESIDUALS))
