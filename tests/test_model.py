"""The GPT model: parity with the reference forward/backward, scan == unrolled, jit == eager, dtypes, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import LOCAL_FIXTURES, shared_fixture
from jaxchat import parity
from jaxchat.model import GPT, GPTConfig, rotary_tables

TINY = GPTConfig(sequence_len=32, vocab_size=100, n_layer=10, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSSL")


def check_parity(fixture_path, tmp_path):
    out_path = tmp_path / "out.npz"
    parity.main([str(fixture_path), "--out", str(out_path)])
    ours, ref = np.load(out_path), np.load(fixture_path)
    assert abs(float(ours["loss"]) - float(ref["loss"])) <= 1e-5
    assert ours["logits"].shape == ref["logits"].shape
    assert np.abs(ours["logits"] - ref["logits"]).max() <= 1e-4
    grads = [k for k in ref.files if k.startswith("grad/")]
    assert sorted(grads) == sorted(k for k in ours.files if k.startswith("grad/"))
    for k in grads:
        scale = np.abs(ref[k]).max()
        assert ours[k].shape == ref[k].shape, k
        assert np.abs(ours[k] - ref[k]).max() <= 1e-4 * scale, k


def test_parity_with_reference_d2(tmp_path):
    check_parity(shared_fixture("nanochat_parity_d2.npz"), tmp_path)


@pytest.mark.parametrize("path", sorted(LOCAL_FIXTURES.glob("ref_*.npz")), ids=lambda p: p.stem)
def test_parity_with_unseen_reference_fixtures(path, tmp_path):
    check_parity(path, tmp_path)


def make_model(config=TINY, **kw):
    model = GPT(config, rngs=nnx.Rngs(0), **kw)
    # Randomise the zero-initialised projections and gates so every path carries signal.
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    nnx.update(model, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), state))
    return model


def batch(config=TINY, B=2, T=24, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    targets = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    targets[0, :3] = -1
    return jnp.asarray(idx), jnp.asarray(targets)


@pytest.mark.parametrize("use_jit", [False, True])
def test_scanned_layers_equal_unrolled(use_jit):
    idx, targets = batch()
    scanned = make_model(scan_layers=True)
    unrolled = make_model(scan_layers=False)
    call = (lambda m, *a: nnx.jit(lambda m, *a: m(*a))(m, *a)) if use_jit else (lambda m, *a: m(*a))
    np.testing.assert_allclose(call(scanned, idx), call(unrolled, idx), atol=2e-5)
    np.testing.assert_allclose(call(scanned, idx, targets), call(unrolled, idx, targets), atol=1e-5)


def test_scanned_layers_have_unrolled_gradients():
    idx, targets = batch()
    grad = nnx.jit(lambda m: nnx.grad(lambda m: m(idx, targets))(m))
    g_scan, g_unroll = grad(make_model(scan_layers=True)), grad(make_model(scan_layers=False))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), nnx.state(g_scan), nnx.state(g_unroll))


def test_outputs_and_reductions():
    model = make_model()
    idx, targets = batch()
    logits = model(idx)
    assert logits.shape == (2, 24, TINY.vocab_size) and logits.dtype == jnp.float32
    assert float(jnp.abs(logits).max()) < 15.0  # softcap
    per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 24)
    assert float(jnp.abs(per_token[0, :3]).max()) == 0.0  # ignored targets
    mean = model(idx, targets)
    np.testing.assert_allclose(mean, per_token.sum() / (targets >= 0).sum(), rtol=1e-6)


def test_bfloat16_compute_close_to_float32():
    idx, targets = batch()
    loss32 = make_model()(idx, targets)
    loss16 = make_model(compute_dtype=jnp.bfloat16)(idx, targets)
    assert loss16.dtype == jnp.float32
    assert abs(float(loss16) - float(loss32)) < 0.05 * float(loss32)


def test_initialisation_follows_reference():
    config = GPTConfig(sequence_len=64, vocab_size=1000, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)
    model = GPT(config, rngs=nnx.Rngs(42))
    assert model.wte.shape == (1024, 256)  # vocab padded to a multiple of 64
    np.testing.assert_allclose(float(model.wte[...].std()), 1.0, rtol=0.02)
    np.testing.assert_allclose(float(model.lm_head[...].std()), 0.001, rtol=0.02)
    bound = np.sqrt(3 / 256)
    for w in (model.blocks.c_q, model.blocks.c_fc, model.value_embeds):
        assert float(jnp.abs(w[...]).max()) <= bound and float(jnp.abs(w[...]).max()) > 0.95 * bound
    for w in (model.blocks.c_proj, model.blocks.mlp_proj, model.blocks.ve_gate):
        assert float(jnp.abs(w[...]).max()) == 0.0
    np.testing.assert_array_equal(model.resid_lambdas[...], 1.0)
    np.testing.assert_allclose(model.x0_lambdas[...], 0.1)
    idx, targets = batch(config)
    assert abs(float(model(idx, targets)) - np.log(1000)) < 0.05  # near-zero logits at init


def test_window_and_value_embedding_layout():
    assert GPTConfig(n_layer=26, n_head=13, n_kv_head=13, n_embd=1664).window_sizes.count(2048) == 7
    assert GPTConfig(n_layer=12).window_sizes == (1024, 1024, 1024, 2048) * 3
    assert GPTConfig(n_layer=4, n_head=2, n_kv_head=2, n_embd=256, window_pattern="s").window_sizes == (1024,) * 3 + (2048,)
    assert GPTConfig(n_layer=4, n_head=2, n_kv_head=2, n_embd=256).ve_layers == (1, 3)
    assert GPTConfig(n_layer=5, n_head=2, n_kv_head=2, n_embd=256).ve_layers == (0, 2, 4)


def test_rotary_tables_are_bfloat16_rounded():
    cos, sin = rotary_tables(16, 8)
    assert cos.dtype == jnp.bfloat16 and cos.shape == (16, 4)
    angle = np.outer(np.arange(16), 1.0 / 10000 ** (np.arange(0, 8, 2) / 8))
    np.testing.assert_allclose(cos.astype(np.float32), np.cos(angle), atol=4e-3)
    np.testing.assert_allclose(sin.astype(np.float32), np.sin(angle), atol=4e-3)


def test_kv_cache_decoding_matches_the_full_forward():
    config = GPTConfig(sequence_len=8, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    model = make_model(config)
    idx, _ = batch(config, B=1, T=14)  # longer than sequence_len: S windows (4) and L windows (8) both bite
    full = model(idx)[0]
    step = nnx.jit(lambda m, token, pos, cache: m.decode_step(token, pos, cache))
    cache = model.init_cache(1, 16)
    for pos in range(idx.shape[1]):
        logits, cache = step(model, idx[:, pos], jnp.int32(pos), cache)
        np.testing.assert_allclose(logits[0], full[pos], atol=2e-5)
