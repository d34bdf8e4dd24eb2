"""The loss heads: softcapped logits and their cross-entropy (nanochat gpt.py GPT.forward, softcap 15), computed
three ways that give the same numbers: plainly, `chunk` positions at a time (--loss-chunk), or fused, with the
lm_head's gradients computed block by block in the forward pass (the default). `LossHead` is the choice, made once
when the model is built.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxchat.model import dense
from jaxchat.model import mesh as meshlib

SOFTCAP = 15.0


def softcap(logits: jax.Array) -> jax.Array:
    """Logits squashed into (-SOFTCAP, SOFTCAP)."""
    return SOFTCAP * jnp.tanh(logits / SOFTCAP)


def vocab_logits(x_BTn: jax.Array, lm_head_nV: jax.Array, vocab_size: int, matmul=None) -> jax.Array:
    """float32 logits over the real vocabulary (the lm_head's padded columns cut off), before the softcap."""
    return (matmul or dense.matmul)(x_BTn, lm_head_nV)[..., :vocab_size].astype(jnp.float32)


def softcapped_logits(x_BTn: jax.Array, lm_head_nV: jax.Array, vocab_size: int, matmul=None) -> jax.Array:
    """float32 logits over the real vocabulary, squashed into (-SOFTCAP, SOFTCAP)."""
    return softcap(vocab_logits(x_BTn, lm_head_nV, vocab_size, matmul))


def token_losses(x_BTn: jax.Array, lm_head_nV: jax.Array, targets_BT: jax.Array, vocab_size: int,
                 matmul=None) -> jax.Array:
    """Per-token losses of the softcapped logits."""
    return softcapped_cross_entropy((matmul or dense.matmul)(x_BTn, lm_head_nV)[..., :vocab_size], targets_BT)


@jax.custom_vjp
def softcapped_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token cross-entropy of softcap(logits) in float32; targets of -1 are ignored and give 0.

    The backward pass is one elementwise pass over the logits; autodiff's goes through take_along_axis's scatter and
    several (tokens, vocab) passes, which XLA:CPU runs slowly."""
    return _softcapped_ce_fwd(logits_BTV, targets_BT)[0]


def _softcapped_ce_fwd(logits_BTV, targets_BT):
    capped_BTV = softcap(logits_BTV.astype(jnp.float32))
    valid_BT = targets_BT >= 0
    # |capped| < SOFTCAP, so exp cannot overflow: no max to subtract first (one pass fewer over the logits)
    logz_BT = jnp.log(jnp.sum(jnp.exp(capped_BTV), axis=-1))
    # the target's logit squashed on its own, so the squashed (tokens, vocab) logits have one reader, the sum above
    picked_BT = softcap(jnp.take_along_axis(logits_BTV, jnp.where(valid_BT, targets_BT, 0)[..., None],
                                            axis=-1)[..., 0].astype(jnp.float32))
    # the logits as they came (bf16 from a bf16 or fp8 lm_head), not their float32 squashed copy: twice the bytes
    return jnp.where(valid_BT, logz_BT - picked_BT, 0.0), (logits_BTV, logz_BT, targets_BT)


def _softcapped_ce_bwd(residuals, g_BT):
    """d loss / d logits = g * (softmax - onehot(target)) * (1 - tanh^2); zero where the target is ignored (-1).
    Returned in the logits' dtype, as the cast to float32 in nanochat's GPT.forward hands its gradient back."""
    logits_BTV, logz_BT, targets_BT = residuals
    # the squash recomputed from the saved logits; the barrier keeps XLA from merging it with the forward's, which
    # would write the float32 squashed logits out in the forward for the backward to read (compiled for 8 H100s:
    # 4.3 GB per micro-batch of the record command)
    capped_BTV = softcap(jax.lax.optimization_barrier(logits_BTV).astype(jnp.float32))
    g_BT1 = jnp.where(targets_BT >= 0, g_BT, 0.0)[..., None]
    onehot_BTV = jnp.arange(capped_BTV.shape[-1]) == targets_BT[..., None]
    softmax_BTV = jnp.exp(capped_BTV - logz_BT[..., None])
    grad_BTV = (g_BT1 * (softmax_BTV - onehot_BTV) * (1 - jnp.square(capped_BTV / SOFTCAP))).astype(logits_BTV.dtype)
    # written out once in the logits' dtype for the lm_head's backward (the fp8 head reads it twice: amax, then the
    # cast), rather than each reader recomputing it from the logits and XLA keeping a float32 copy between them
    return jax.lax.optimization_barrier(grad_BTV), None


softcapped_cross_entropy.defvjp(_softcapped_ce_fwd, _softcapped_ce_bwd)


def fused_mean_cross_entropy(x_BTn: jax.Array, lm_head_nV: jax.Array, targets_BT: jax.Array,
                             vocab_size: int, block_tokens: int) -> jax.Array:
    """The mean loss over tokens whose target is not -1, as `token_losses(...)` summed and divided by their count,
    with its gradients computed in the forward pass, about `block_tokens` tokens per device at a time
    (Backend.loss_block_tokens).

    The plain loss head writes the (tokens, vocab) float32 logits and reads them back in separate passes (softcap and
    logsumexp forward; softmax, one-hot and the softcap's derivative backward) between its three GEMMs. Per block
    of tokens here, the block's logits feed the loss and, still in cache, their gradient, which goes straight into
    the two gradient GEMMs (dx, and dW accumulated over blocks). The loss is a scalar, so its cotangent only scales
    the gradients: the backward pass multiplies by it. The (tokens, vocab) logits never exist whole. Without
    differentiation (evaluation) it computes the plain loss head.

    A block is every row's next `t` positions, so the rows stay split over the data-parallel devices and each device
    works on every block (blocks of whole rows would each live on one device).
    """
    B, T, n = x_BTn.shape
    rows = max(1, B // meshlib.data_shards())
    n_blocks = -(-T // max(1, block_tokens // rows))
    t = -(-T // n_blocks)
    pad = n_blocks * t - T  # padded positions get target -1: no loss, no gradient
    x_NBtn = jnp.pad(x_BTn, ((0, 0), (0, pad), (0, 0))).reshape(B, n_blocks, t, n).swapaxes(0, 1)
    targets_NBt = jnp.pad(targets_BT, ((0, 0), (0, pad)), constant_values=-1).reshape(B, n_blocks, t).swapaxes(0, 1)
    return _fused_mean_ce(x_NBtn, lm_head_nV, targets_NBt, vocab_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_mean_ce(x_NBtn, lm_head_nV, targets_NBt, vocab_size):
    losses = token_losses(x_NBtn, lm_head_nV, targets_NBt, vocab_size)
    return losses.sum() / jnp.maximum((targets_NBt >= 0).sum(), 1)


def _fused_mean_ce_fwd(x_NBtn, lm_head_nV, targets_NBt, vocab_size):
    w_nV = lm_head_nV[:, :vocab_size].astype(x_NBtn.dtype)  # the padded vocabulary columns get no logits
    count = jnp.maximum((targets_NBt >= 0).sum(), 1).astype(jnp.float32)

    def one_block(carry, xs):
        loss, dw_nV = carry
        x_Btn, targets_Bt = xs
        capped_BtV = softcap(jnp.einsum("bti,iv->btv", x_Btn, w_nV).astype(jnp.float32))
        valid_Bt = targets_Bt >= 0
        exp_BtV = jnp.exp(capped_BtV)  # |capped| < SOFTCAP: no max to subtract (see softcapped_cross_entropy)
        sum_Bt = jnp.sum(exp_BtV, axis=-1)
        picked_Bt = jnp.take_along_axis(capped_BtV, jnp.where(valid_Bt, targets_Bt, 0)[..., None], axis=-1)[..., 0]
        loss = loss + jnp.sum(jnp.where(valid_Bt, jnp.log(sum_Bt) - picked_Bt, 0.0))
        # d mean / d logits = (softmax - onehot) * (1 - tanh^2) / count on valid tokens: _softcapped_ce_fwd and _bwd's
        # formulas written out, reusing exp_BtV; calling them recomputes the exponentials (64 against 80 ms, demo shape)
        weight_Bt = jnp.where(valid_Bt, 1 / count, 0.0)
        onehot_BtV = jnp.arange(vocab_size) == targets_Bt[..., None]
        g_BtV = ((exp_BtV * (weight_Bt / sum_Bt)[..., None] - jnp.where(onehot_BtV, weight_Bt[..., None], 0.0))
                 * (1 - jnp.square(capped_BtV / SOFTCAP))).astype(x_Btn.dtype)
        dx_Btn = jnp.einsum("btv,iv->bti", g_BtV, w_nV)
        return (loss, dw_nV + jnp.einsum("bti,btv->iv", x_Btn, g_BtV, preferred_element_type=jnp.float32)), dx_Btn

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w_nV.shape, jnp.float32))
    (loss, dw_nV), dx_NBtn = jax.lax.scan(one_block, init, (x_NBtn, targets_NBt))
    # rounded to the compute dtype once, as the plain head's one dW GEMM (and torch autocast's) rounds its output
    dw_nV = jnp.pad(dw_nV.astype(x_NBtn.dtype), ((0, 0), (0, lm_head_nV.shape[1] - vocab_size)))
    return loss / count, (dx_NBtn, dw_nV.astype(lm_head_nV.dtype))


def _fused_mean_ce_bwd(vocab_size, residuals, g):
    dx_NBtn, dw_nV = residuals
    return (g * dx_NBtn).astype(dx_NBtn.dtype), (g * dw_nV).astype(dw_nV.dtype), None


_fused_mean_ce.defvjp(_fused_mean_ce_fwd, _fused_mean_ce_bwd)


def chunked_cross_entropy(x_BTn: jax.Array, lm_head_nV: jax.Array, targets_BT: jax.Array, vocab_size: int,
                          chunk: int, matmul=None) -> jax.Array:
    """Per-token losses (B, T) computed `chunk` positions at a time, rematerialised in the backward pass, so the
    (B, T, V) float32 logits never exist at once: at most (B, chunk, V) does, forward and backward."""
    B, T, n = x_BTn.shape
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    if pad:  # padded positions get target -1, hence loss 0, and are cut off below
        x_BTn = jnp.pad(x_BTn, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)), constant_values=-1)
    x_NBtn = x_BTn.reshape(B, n_chunks, chunk, n).swapaxes(0, 1)
    targets_NBt = targets_BT.reshape(B, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint  # keep only each chunk's inputs; its logits are recomputed in the backward pass
    def one_chunk(x_Btn, targets_Bt):
        return token_losses(x_Btn, lm_head_nV, targets_Bt, vocab_size, matmul)

    _, losses_NBt = jax.lax.scan(lambda carry, xs: (carry, one_chunk(*xs)), None, (x_NBtn, targets_NBt))
    return losses_NBt.swapaxes(0, 1).reshape(B, n_chunks * chunk)[:, :T]


@dataclasses.dataclass(frozen=True)
class LossHead:
    """Which head computes the loss: "plain", "chunked" (`chunk` positions at a time) or "fused" (blocks of about
    `block_tokens` tokens per device, the mean loss only)."""

    kind: str
    chunk: int = 0
    block_tokens: int = 0

    def mean(self, x_BTn, lm_head_nV, targets_BT, vocab_size: int, matmul) -> jax.Array:
        """The mean loss over tokens whose target is not -1."""
        if self.kind == "fused":
            return fused_mean_cross_entropy(x_BTn, lm_head_nV, targets_BT, vocab_size, self.block_tokens)
        losses_BT = self.per_token(x_BTn, lm_head_nV, targets_BT, vocab_size, matmul)
        return losses_BT.sum() / jnp.maximum((targets_BT >= 0).sum(), 1)

    def per_token(self, x_BTn, lm_head_nV, targets_BT, vocab_size: int, matmul) -> jax.Array:
        """Per-token losses (B, T), 0 where the target is -1 (the fused head has none: the plain head's)."""
        if self.kind == "chunked":
            return chunked_cross_entropy(x_BTn, lm_head_nV, targets_BT, vocab_size, self.chunk, matmul)
        return token_losses(x_BTn, lm_head_nV, targets_BT, vocab_size, matmul)


def choose(backend, loss_chunk: int, fp8: bool) -> LossHead:
    """--loss-chunk when set; else the fused head, unless fp8 is on (the fused head's GEMMs are not fp8's); else the
    plain head. Fused on every platform: on CPU it is faster; on GPU and TPU it keeps the (tokens, vocab) float32
    logits and their gradient out of memory (d24 at device batch 16: 4 GiB each)."""
    if loss_chunk < 0:
        raise ValueError(f"loss_chunk {loss_chunk} must be 0 (off) or a positive number of positions")
    if loss_chunk:
        return LossHead("chunked", chunk=loss_chunk)
    if not fp8:
        return LossHead("fused", block_tokens=backend.loss_block_tokens)
    return LossHead("plain")
