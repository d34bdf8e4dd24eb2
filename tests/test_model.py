"""The GPT model: parity with the reference forward/backward, scan == unrolled, jit == eager, dtypes, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import LOCAL_FIXTURES, shared_fixture
from jaxchat import parity
import json

from jaxchat.interop.convert import read_reference_npz, to_reference
from jaxchat.model import params as paramslib
from jaxchat.model.gpt import GPT, Blocks, GPTConfig, estimate_flops, layer_runs, num_scaling_params, rotary_tables
from jaxchat.training.config import config_for_depth

TINY = GPTConfig(sequence_len=32, vocab_size=100, n_layer=10, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSSL")


def check_parity(fixture_path, tmp_path):
    out_path = tmp_path / "out.npz"
    parity.main([str(fixture_path), "--out", str(out_path)])
    check_forward(np.load(out_path), np.load(fixture_path))


def check_forward(ours, ref):
    """Loss within 1e-5, logits within 1e-4, every gradient within 1e-4 of its largest magnitude."""
    assert abs(float(ours["loss"]) - float(ref["loss"])) <= 1e-5
    assert ours["logits"].shape == ref["logits"].shape
    assert np.abs(ours["logits"] - ref["logits"]).max() <= 1e-4
    grads = [k for k in ref.files if k.startswith("grad/")]
    assert sorted(grads) == sorted(k for k in ours if k.startswith("grad/"))
    for k in grads:
        scale = np.abs(ref[k]).max()
        assert ours[k].shape == ref[k].shape, k
        assert np.abs(ours[k] - ref[k]).max() <= 1e-4 * scale, k


@pytest.mark.slow
def test_parity_with_reference_d2(tmp_path):
    check_parity(shared_fixture("nanochat_parity_d2.npz"), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(LOCAL_FIXTURES.glob("ref_*.npz")), ids=lambda p: p.stem)
def test_parity_with_unseen_reference_fixtures(path):
    """Forward and gradients (the d2 test above goes through the command line; these fixtures' optimizer steps are
    tests/test_optim_parity.py's)."""
    with np.load(path) as ref:
        check_forward(parity.compute_forward(str(path))[0], ref)


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


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [False, True])
def test_scanned_layers_equal_unrolled(use_jit):
    idx, targets = batch()
    scanned = make_model(scan_layers=True)
    unrolled = make_model(scan_layers=False)
    call = (lambda m, *a: nnx.jit(lambda m, *a: m(*a))(m, *a)) if use_jit else (lambda m, *a: m(*a))
    np.testing.assert_allclose(call(scanned, idx), call(unrolled, idx), atol=2e-5)
    np.testing.assert_allclose(call(scanned, idx, targets), call(unrolled, idx, targets), atol=1e-5)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.parametrize("recipe", ["348fbb3", "92d63d4"])
def test_kv_cache_decoding_matches_the_full_forward(recipe):
    """Windows bite past sequence_len; in 92d63d4 the smear reads the previous token's embedding from the cache."""
    config = GPTConfig(sequence_len=8, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL",
                       recipe=recipe)
    model = make_model(config)
    idx, _ = batch(config, B=1, T=14)  # longer than sequence_len: S windows (4) and L windows (8) both bite
    full = model(idx)[0]
    step = nnx.jit(lambda m, token, pos, cache: m.decode_step(token, pos, cache))
    cache = model.init_cache(1, 16)
    for pos in range(idx.shape[1]):
        logits, cache = step(model, idx[:, pos], jnp.int32(pos), cache)
        np.testing.assert_allclose(logits[0], full[pos], atol=2e-5)


# ----------------------------------------------------------------------------------------------------------------
# Recipe 92d63d4 (nanochat R92D63D4): smear, backout, VE gate 12 x3, QK x1.2, RoPE 1e5, quarter windows, new inits

R92D63D4 = GPTConfig(sequence_len=32, vocab_size=100, n_layer=12, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL",
                 recipe="92d63d4")


@pytest.mark.parametrize("name", ["nanochat_head_d4.npz", "nanochat_head_d4_bf16muon.npz"])
def test_parity_with_reference_recipe_92d63d4(name):
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity, as the parity CLI sets it
    ours, model, ref = parity.compute_forward(str(shared_fixture(name)))
    assert model.config.recipe == "92d63d4" and model.config.backout_layer == 2
    assert model.config.window_sizes == tuple(ref["config/window_sizes"].tolist()) == (128, 256, 128, 256)
    check_forward(ours, ref)


def check_distribution(x, name, low=None, high=None, std=None):
    """Uniform(low, high) or Normal(0, std) by bounds, mean and standard deviation (tolerances from the sample size)."""
    x = np.asarray(x, np.float64).ravel()
    if std is None:
        assert x.min() >= low and x.max() <= high, name
        spread = (high - low) / np.sqrt(12)
        assert abs(x.mean() - (low + high) / 2) <= 5 * spread / np.sqrt(x.size), name
        np.testing.assert_allclose(x.std(), spread, rtol=5 / np.sqrt(x.size), err_msg=name)
    else:
        assert abs(x.mean()) <= 5 * std / np.sqrt(x.size), name
        np.testing.assert_allclose(x.std(), std, rtol=5 / np.sqrt(x.size), err_msg=name)


def test_initialisation_follows_reference_recipe_92d63d4():
    """nanochat 92d63d4 GPT.init_weights: the fixture's init/* deterministic entries exactly, random ones by law."""
    config, _, data = read_reference_npz(str(shared_fixture("nanochat_head_d4.npz")))
    ours = to_reference(nnx.to_pure_dict(nnx.state(GPT(config, rngs=nnx.Rngs(7)), nnx.Param)), config)
    ref = {k.removeprefix("init/"): data[k] for k in data.files if k.startswith("init/")}
    assert sorted(ours) == sorted(ref)
    s = np.sqrt(3 / config.n_embd)
    for name in ref:
        assert ours[name].shape == ref[name].shape and ours[name].dtype == ref[name].dtype, name
        if name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda") or name.endswith("c_proj.weight"):
            np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
            continue
        law = (dict(std=0.8) if name == "transformer.wte.weight" else dict(std=0.001) if name == "lm_head.weight"
               else dict(low=0.0, high=0.02) if "gate" in name else dict(low=-0.4 * s, high=0.4 * s) if "c_fc" in name
               else dict(low=-s, high=s))
        for x in (ours[name], ref[name]):  # the reference's own draw checks the law itself
            check_distribution(x, name, **law)
    np.testing.assert_allclose(ours["resid_lambdas"], [1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05], rtol=1e-7)


def test_parameter_counts_and_flops_match_reference_recipe_92d63d4():
    """nanochat 92d63d4 num_scaling_params and estimate_flops (bf16 count) at the default shape, d4 to d32."""
    data = np.load(shared_fixture("nanochat_head_d4.npz"))
    depths = json.loads(str(data["schedule/json"]))["depths"]
    assert len(depths) >= 8
    for depth, row in depths.items():
        config = config_for_depth(int(depth), recipe="92d63d4")
        counts = num_scaling_params(config)
        assert {k: counts[k] for k in row["counts"]} == row["counts"], depth
        assert counts["scalars"] == 2 * config.n_layer + 26
        assert estimate_flops(config) == row["flops_per_token"], depth
    # 348fbb3 at the same depth: the smear gate (24) is the only extra matmul weight, the VE gate shrinks 32 -> 12
    d24, old = config_for_depth(24, recipe="92d63d4"), config_for_depth(24)
    assert num_scaling_params(old)["transformer_matrices"] - num_scaling_params(d24)["transformer_matrices"] == 12 * 20 * 12


def test_recipe_92d63d4_windows_and_runs():
    assert config_for_depth(24, recipe="92d63d4").window_sizes == (512, 512, 512, 2048) * 6
    assert GPTConfig(sequence_len=1000, n_layer=2, recipe="92d63d4").window_sizes == (256, 1000)
    assert GPTConfig(sequence_len=64, n_layer=2, recipe="92d63d4").window_sizes == (128, 64)
    # R92D63D4: backout reads layer 6's output, so a run ends there; the run after it starts at an odd layer
    assert layer_runs(R92D63D4, scan=True) == [(0, 2, 3), (6, 1, 1), (7, 2, 2), (11, 1, 1)]
    assert layer_runs(TINY, scan=True) == [(0, 4, 2), (8, 1, 1), (9, 1, 1)]  # 348fbb3: no backout, as before
    assert layer_runs(R92D63D4, scan=False) == [(i, 1, 1) for i in range(12)]


@pytest.mark.slow
def test_recipe_92d63d4_scanned_layers_equal_unrolled():
    """Jitted only: the runs around backout are what is new here, and op by op (29 s) adds nothing that
    test_scanned_layers_equal_unrolled's eager case does not check."""
    idx, targets = batch(R92D63D4)
    scanned, unrolled = make_model(R92D63D4, scan_layers=True), make_model(R92D63D4, scan_layers=False)
    call = lambda m, *a: nnx.jit(lambda m, *a: m(*a))(m, *a)  # noqa: E731
    np.testing.assert_allclose(call(scanned, idx), call(unrolled, idx), atol=2e-5)
    np.testing.assert_allclose(call(scanned, idx, targets), call(unrolled, idx, targets), atol=1e-5)


@pytest.mark.slow
def test_recipe_92d63d4_scanned_layers_have_unrolled_gradients():
    idx, targets = batch(R92D63D4)
    grad = nnx.jit(lambda m: nnx.grad(lambda m: m(idx, targets))(m))
    g_scan = nnx.state(grad(make_model(R92D63D4, scan_layers=True)))
    g_unroll = nnx.state(grad(make_model(R92D63D4, scan_layers=False)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_scan, g_unroll)
    assert float(jnp.abs(g_scan["backout_lambda"][...])) > 0 and float(jnp.abs(g_scan["smear_gate"][...]).max()) > 0


def test_recipe_92d63d4_parameter_tree():
    model = GPT(R92D63D4, rngs=nnx.Rngs(0))
    assert model.smear_gate.shape == (24, 1) and model.smear_lambda.shape == () and model.backout_lambda.shape == ()
    assert model.blocks.ve_gate.shape == (6, 12, 1)
    assert not hasattr(GPT(TINY, rngs=nnx.Rngs(0)), "smear_gate")  # 348fbb3's tree is unchanged


def test_the_annotated_parameters_are_the_declared_ones():
    """GPT's and Blocks' nnx.Param annotations (what a reader and an IDE see) name exactly jaxchat.model.params.PARAMS,
    and the 92d63d4 model, which has all of them, holds each where its annotation says."""
    annotated = {f"blocks/{k}" for k, v in Blocks.__annotations__.items() if v is nnx.Param}
    annotated |= {k for k, v in GPT.__annotations__.items() if v is nnx.Param}
    assert annotated == {p.path for p in paramslib.PARAMS}
    state = nnx.to_pure_dict(nnx.state(GPT(R92D63D4, rngs=nnx.Rngs(0)), nnx.Param))
    assert {p.path for p in paramslib.PARAMS} == {f"{k}/{j}" if isinstance(v, dict) else k
                                                 for k, v in state.items() for j in (v if isinstance(v, dict) else [0])}


def test_recipe_92d63d4_rotary_tables_in_compute_dtype():
    model = GPT(R92D63D4, rngs=nnx.Rngs(0))
    cos, _ = model._rotary(16)
    assert cos.dtype == jnp.float32  # not bf16-rounded, unlike 348fbb3
    angle = np.outer(np.arange(16), 1.0 / 100000 ** (np.arange(0, 32, 2) / 32))
    np.testing.assert_allclose(cos, np.cos(angle), atol=1e-6)
    bf16 = GPT(R92D63D4, rngs=nnx.Rngs(0), compute_dtype=jnp.bfloat16)
    assert bf16._rotary(16)[0].dtype == jnp.bfloat16




@pytest.mark.slow
def test_model_mean_loss_uses_the_fused_head_on_cpu():
    """GPT's mean loss and its gradients equal those of its per-token losses (the plain head) on CPU."""
    config = GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    model = make_model(config)
    idx, targets = batch(config)
    graphdef, state = nnx.split(model)

    def loss(state, reduction):
        losses = nnx.merge(graphdef, state)(idx, targets, reduction=reduction)
        return losses if reduction == "mean" else losses.sum() / (targets >= 0).sum()

    assert model.loss_head.kind == "fused"
    jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(state, "mean"))
    plain_jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(state, "none"))
    assert "custom_vjp_call" in jaxpr and "scan" in jaxpr  # the fused head's custom_vjp over its blocks
    # ... which is what makes it fused: the (B, T, Vp) logits exist in the plain head's program, never in its own
    full_logits = "f32[{},{},{}]".format(*idx.shape, config.padded_vocab)
    assert full_logits in plain_jaxpr and full_logits not in jaxpr
    (fused_loss, fused_grads), (plain_loss, plain_grads) = (
        jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, r) for r in ("mean", "none"))
    np.testing.assert_allclose(fused_loss, plain_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fn", ["rmsnorm", "_mix", "_relu_squared"])
def test_narrow_elementwise_steps_are_recomputed_without_a_barrier(fn):
    """In bf16 the norms, the lambda mix and relu^2 are recomputed in the backward pass (only their bf16 inputs kept);
    where the backend drops the barrier (Backend.recompute_barrier: GPU) no optimisation barrier fences off the
    incoming gradient (model.recomputed_when_narrow), elsewhere it stays; the gradients are those of the plain
    function either way; in float32 nothing is wrapped."""
    from jaxchat.model import gpt as modellib
    from jaxchat.model.remat import barrier_kept
    f = getattr(modellib, fn)
    args = [jnp.linspace(-2, 2, 4 * 64, dtype=jnp.bfloat16).reshape(4, 64)]
    args += [args[0][::-1], jnp.float32(0.7), jnp.float32(0.2)] if fn == "_mix" else []
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(*args))  # recomputed in the backward
    with barrier_kept(False):
        assert "optimization_barrier" not in jax.jit(jax.grad(loss)).lower(*args).as_text()
        without = jax.grad(loss)(*args)
    assert "optimization_barrier" in jax.jit(jax.grad(loss)).lower(*args).as_text()
    np.testing.assert_array_equal(without, jax.grad(loss)(*args))
    plain = lambda *a: jnp.sum(f.__wrapped__(*a).astype(jnp.float32) ** 2)
    np.testing.assert_array_equal(jax.grad(loss)(*args), jax.grad(plain)(*args))
    f32 = [a.astype(jnp.float32) for a in args]
    assert "remat" not in str(jax.make_jaxpr(jax.grad(loss))(*f32))


def test_under_a_remat_policy_the_narrow_steps_keep_their_barrier():
    """Inside a layer that a --remat policy recomputes, the norms' own recomputation keeps jax.checkpoint's barrier
    (without it XLA merges the two recomputations and keeps the float32 intermediates: d24 at device batch 32 grew
    from 62.2 to 85.5 GiB with --remat=dots); outside one it has none (the test above)."""
    from jaxchat.model import gpt
    from jaxchat.model.remat import barrier_kept, remat_layer
    x = jnp.linspace(-2, 2, 4 * 64, dtype=jnp.bfloat16).reshape(4, 64)
    barriers = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(remat_layer(f, "block")(x).astype(jnp.float32) ** 2))
                                 ).lower(x).as_text().count("optimization_barrier")
    with barrier_kept(False):  # as on GPU
        assert barriers(gpt.rmsnorm) > barriers(gpt.rmsnorm.__wrapped__)
