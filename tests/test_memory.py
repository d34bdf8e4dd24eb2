"""Memory planning: predicted peak memory, --device-batch-size=auto, the out-of-memory message, and the
memory-saving model options (chunked cross-entropy, rematerialisation, bfloat16 tables) leave the numbers alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


from jaxchat import mesh as meshlib
from jaxchat import optim
from jaxchat.common import UserError
from jaxchat.model import GPT, GPTConfig

# 5 layers of period 2 (pattern L, VE every other layer): 2 scanned repeats and 1 unrolled tail layer.
TINY = GPTConfig(sequence_len=32, vocab_size=100, n_layer=5, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")


def make_model(**kw) -> GPT:
    model = GPT(TINY, rngs=nnx.Rngs(0), **kw)
    # Randomise the zero-initialised projections and gates so every path carries signal.
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    nnx.update(model, jax.tree.map(lambda p: p + (0.05 * jax.random.normal(next(keys), p.shape)).astype(p.dtype),
                                   state))
    return model


def batch(B=2, T=24, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, TINY.vocab_size, (B, T)).astype(np.int32)
    targets = rng.integers(0, TINY.vocab_size, (B, T)).astype(np.int32)
    targets[0, :3] = -1
    return jnp.asarray(idx), jnp.asarray(targets)


def loss_and_grads(model, idx, targets):
    return nnx.jit(lambda m: nnx.value_and_grad(lambda m: m(idx, targets))(m))(model)


def per_token_losses_and_logits(model, idx, targets):
    return nnx.jit(lambda m: (m(idx, targets, reduction="none"), m(idx)))(model)


def assert_same_loss_and_grads(a, b, rtol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=rtol)
    for (path, ga), (_, gb) in zip(nnx.to_flat_state(nnx.state(grads_a)), nnx.to_flat_state(nnx.state(grads_b))):
        ga, gb = np.asarray(ga[...], np.float32), np.asarray(gb[...], np.float32)
        assert np.abs(ga - gb).max() <= rtol * max(np.abs(gb).max(), 1e-6), path


@pytest.mark.parametrize("chunk", [8, 7])  # 24 positions: 3 even chunks, or 4 with padding
def test_chunked_cross_entropy_equals_plain(chunk):
    idx, targets = batch()
    plain, chunked = make_model(), make_model(loss_chunk=chunk)
    assert_same_loss_and_grads(loss_and_grads(chunked, idx, targets), loss_and_grads(plain, idx, targets))
    (losses_chunked, logits_chunked), (losses_plain, logits_plain) = (
        per_token_losses_and_logits(m, idx, targets) for m in (chunked, plain))
    np.testing.assert_allclose(losses_chunked, losses_plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(logits_chunked, logits_plain)  # logits without targets are not chunked


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_gives_identical_loss_and_grads(remat):
    idx, targets = batch()
    assert_same_loss_and_grads(loss_and_grads(make_model(remat=remat), idx, targets),
                               loss_and_grads(make_model(), idx, targets), rtol=1e-6)


def test_bfloat16_tables_are_stored_bfloat16_and_train():
    model = make_model(embed_dtype=jnp.bfloat16)
    assert model.wte[...].dtype == jnp.bfloat16 and model.value_embeds[...].dtype == jnp.bfloat16
    assert model.lm_head[...].dtype == jnp.float32
    loss, grads = loss_and_grads(model, *batch())
    assert np.isfinite(float(loss)) and grads.wte[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(float(loss), float(loss_and_grads(make_model(), *batch())[0]), rtol=1e-2)


def test_bad_remat_name_is_a_user_error():
    with pytest.raises(UserError, match="--remat"):
        GPT(TINY, rngs=nnx.Rngs(0), remat="everything")
