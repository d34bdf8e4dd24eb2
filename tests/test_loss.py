"""The loss heads: hand-written backward passes equal autodiff's; the fused head equals the plain one; the choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.model import loss as losslib
from jaxchat.runtime import backend


@pytest.mark.slow
def test_softcapped_cross_entropy_gradient_is_autodiffs():
    """The hand-written backward equals autodiff of the plain formula, ignored targets (-1) included."""
    logits = 20 * jax.random.normal(jax.random.key(2), (3, 7, 50))
    targets = jax.random.randint(jax.random.key(3), (3, 7), 0, 50).at[0, :3].set(-1)

    def plain(logits):
        capped = losslib.SOFTCAP * jnp.tanh(logits / losslib.SOFTCAP)
        picked = jnp.take_along_axis(capped, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(targets >= 0, jax.nn.logsumexp(capped, axis=-1) - picked, 0.0)

    weights = jax.random.uniform(jax.random.key(4), (3, 7))
    np.testing.assert_allclose(losslib.softcapped_cross_entropy(logits, targets), plain(logits), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda z: (losslib.softcapped_cross_entropy(z, targets) * weights).sum())(logits)
    want = jax.grad(lambda z: (plain(z) * weights).sum())(logits)
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-6)
    assert not np.any(ours[0, :3])  # ignored positions get no gradient


def test_bf16_logits_give_the_float32_losses_and_a_bf16_gradient():
    """bf16 logits (a bf16 or fp8 lm_head's) go into the loss as they are, computed in float32 inside: the same losses
    as the float32 copy of them, and the float32 copy's gradient rounded to bf16, which is what the cast to float32
    in nanochat's GPT.forward hands back; the bf16 logits are what the backward keeps, not a float32 squashed copy."""
    logits = (20 * jax.random.normal(jax.random.key(2), (3, 7, 50))).astype(jnp.bfloat16)
    targets = jax.random.randint(jax.random.key(3), (3, 7), 0, 50).at[0, :3].set(-1)
    weights = jax.random.uniform(jax.random.key(4), (3, 7))
    f = jax.jit(lambda z: (losslib.softcapped_cross_entropy(z, targets) * weights).sum())
    np.testing.assert_array_equal(losslib.softcapped_cross_entropy(logits, targets),
                                  losslib.softcapped_cross_entropy(logits.astype(jnp.float32), targets))
    grad = jax.grad(f)(logits)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(grad, jax.grad(f)(logits.astype(jnp.float32)).astype(jnp.bfloat16))
    kept = jax.tree.leaves(jax.vjp(lambda z: losslib.softcapped_cross_entropy(z, targets), logits)[1])
    assert [x.dtype for x in kept if x.shape == logits.shape] == [jnp.bfloat16]  # the residual the backward reads


@pytest.mark.parametrize("use_jit", [pytest.param(False, marks=pytest.mark.slow), True])  # eager: slow dispatches
def test_fused_mean_cross_entropy_equals_the_plain_loss_head(use_jit):
    """Loss and gradients (x, lm_head) of the blocked head with its gradients from the forward pass equal autodiff
    of the plain head: several blocks, the last one padded, ignored targets, padded vocabulary columns, and a
    cotangent other than 1 (gradient accumulation scales the loss)."""
    vocab = 50  # padded to 64 columns
    x = jax.random.normal(jax.random.key(5), (3, 7, 16))
    lm_head = 0.5 * jax.random.normal(jax.random.key(6), (16, 64))
    targets = jax.random.randint(jax.random.key(7), (3, 7), 0, vocab).at[0, :3].set(-1)

    def plain(x, lm_head):
        return 0.25 * losslib.token_losses(x, lm_head, targets, vocab).sum() / (targets >= 0).sum()

    def fused(x, lm_head):
        return 0.25 * losslib.fused_mean_cross_entropy(x, lm_head, targets, vocab, block_tokens=6)  # 3 rows x 2 positions: 4 blocks, the last padded

    grad = (lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))) if use_jit else (
        lambda f: jax.value_and_grad(f, argnums=(0, 1)))
    (loss, (dx, dw)), (want_loss, (want_dx, want_dw)) = grad(fused)(x, lm_head), grad(plain)(x, lm_head)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-7)
    assert not np.any(dw[:, vocab:]) and not np.any(dx[0, :3])  # padded columns, ignored tokens: no gradient
    np.testing.assert_allclose(fused(x, lm_head), want_loss, rtol=1e-6)  # undifferentiated: the plain head


def test_choice_of_head():
    """--loss-chunk wins; the fused head where the backend has it and fp8 is off; else the plain head."""
    cpu = backend.local("float32")
    assert losslib.choose(cpu, 0, fp8=False) == losslib.LossHead("fused", block_tokens=cpu.loss_block_tokens)
    assert losslib.choose(cpu, 7, fp8=False) == losslib.LossHead("chunked", chunk=7)
    assert losslib.choose(cpu, 0, fp8=True).kind == "plain"
    with pytest.raises(ValueError, match="loss_chunk -1"):
        losslib.choose(cpu, -1, fp8=False)
