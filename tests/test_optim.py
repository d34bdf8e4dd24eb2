"""MuonAdamW pieces (nanochat/optim.py) against float64 transcriptions of the reference, and the schedules (scripts/base_train.py)."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxchat.training import optim, recipe
from jaxchat.training.config import optimizer_flags

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

R348 = recipe.get("348fbb3")  # the AdamW groups, Muon variant and schedules of recipe 348fbb3


def well_conditioned(rng, shape, cond=300.0, scale=7.0):
    """Random matrices (..., m, n) with singular values spread log-uniformly over [1/cond, 1] · scale."""
    *batch, m, n = shape
    k = min(m, n)
    out = []
    for _ in range(int(np.prod(batch, dtype=int))):
        U, _ = np.linalg.qr(rng.normal(size=(m, k)))
        V, _ = np.linalg.qr(rng.normal(size=(n, k)))
        out.append((U * np.geomspace(1 / cond, 1, k) * scale) @ V.T)
    return np.stack(out).reshape(shape).astype(np.float32)


def tiny_params(rng, n=32, L=2, Vp=64):
    """A parameter tree with jaxchat's structure (Flax kernel layout, blocks stacked over layers)."""
    shapes = {"wte": (Vp, n), "lm_head": (n, Vp), "resid_lambdas": (L,), "x0_lambdas": (L,), "value_embeds": (1, Vp, n),
              "blocks": {"c_q": (L, n, n), "c_k": (L, n, n), "c_v": (L, n, n), "c_proj": (L, n, n),
                         "c_fc": (L, n, 4 * n), "mlp_proj": (L, 4 * n, n), "ve_gate": (1, 32, 2)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))


# ------------------------------------------------------------------ float64 transcriptions of nanochat/optim.py adamw_step_fused, muon_step_fused

def ref_polar_express(X, norm=1.02):
    X = X / (np.linalg.norm(X, axis=(-2, -1), keepdims=True) * norm + 1e-6)
    for a, b, c in optim.POLAR_EXPRESS_COEFFS:
        if X.shape[-2] > X.shape[-1]:
            A = X.swapaxes(-1, -2) @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.swapaxes(-1, -2)
            X = a * X + (b * A + c * A @ A) @ X
    return X


def ref_muon_step(G, P, M, S, *, lr, mu, wd, beta2=0.95, recipe_92d63d4=False):
    """One reference Muon step on (K, rows, cols) in float64: returns (P, M, S); recipe_92d63d4: its muon_step_fused."""
    M = mu * M + (1 - mu) * G
    X = (1 - mu) * G + mu * M
    fro = lambda A: np.linalg.norm(A, axis=(-2, -1), keepdims=True)  # noqa: E731
    if recipe_92d63d4:  # MuonEq: every row to the mean row norm
        X = X * (fro(X) / np.sqrt(X.shape[-2])) / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-6)
    O = ref_polar_express(X, 1.01 if recipe_92d63d4 else 1.02)
    if recipe_92d63d4:  # Muon+: Frobenius norm of a semi-orthogonal matrix
        O = O * np.sqrt(min(O.shape[-2:])) / np.maximum(fro(O), 1e-6)
    red = -1 if O.shape[-2] >= O.shape[-1] else -2
    N = O.shape[red]
    v = np.mean(O**2, axis=red, keepdims=True)
    vnorm = np.sqrt(np.sum(v * N, axis=(-2, -1), keepdims=True))
    S = beta2 * S + (1 - beta2) * v
    step = 1 / np.sqrt(np.maximum(S, 1e-10))
    vnorm_new = np.sqrt(np.sum(v * N * step**2, axis=(-2, -1), keepdims=True))
    O = O * step * vnorm / np.maximum(vnorm_new, 1e-10)
    lr_eff = lr * math.sqrt(max(1, O.shape[-2] / O.shape[-1]))
    mask = O * P >= 0
    return P - lr_eff * O - lr_eff * wd * P * mask, M, S


# ------------------------------------------------------------------ Polar Express, NorMuon, cautious update

@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32), (3, 24, 40), (2, 40, 24)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_polar_express_singular_values_in_band(shape, dtype):
    X = well_conditioned(np.random.default_rng(0), shape)
    O = optim.polar_express(jnp.asarray(X), dtype)
    assert O.dtype == dtype and O.shape == shape
    sv = np.linalg.svd(np.asarray(O, np.float32), compute_uv=False)
    assert 0.8 < sv.min() and sv.max() < 1.2, (sv.min(), sv.max())


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_polar_express_matches_float64_transcription(shape):
    X = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    O = np.asarray(jax.jit(optim.polar_express, static_argnums=1)(jnp.asarray(X), jnp.float32))
    np.testing.assert_allclose(O, ref_polar_express(X.astype(np.float64)), atol=2e-5)


@pytest.mark.parametrize("shape", [(2, 48, 16), (2, 16, 48), (1, 32, 32)])
def test_normuon_preserves_frobenius_norm(shape):
    rng = np.random.default_rng(2)
    O = jnp.asarray(rng.normal(size=shape), jnp.float32)
    rows, cols = shape[-2:]
    S0 = jnp.asarray(rng.uniform(0, 1, size=(shape[0], rows, 1) if rows >= cols else (shape[0], 1, cols)), jnp.float32)
    for S in (jnp.zeros_like(S0), S0):
        O2, S2 = jax.jit(optim.normuon)(O, S, jnp.float32(0.95))
        chex.assert_shape(S2, S.shape)
        np.testing.assert_allclose(jnp.linalg.norm(O2, axis=(-2, -1)), jnp.linalg.norm(O, axis=(-2, -1)), rtol=1e-5)
        assert not np.allclose(O2, O)  # it did rescale rows/columns


def test_cautious_weight_decay_mask():
    O = jnp.array([[1.0, -1.0], [2.0, 0.0]])
    P = jnp.array([[3.0, 3.0], [-1.0, 5.0]])
    u = optim.muon_matrix_update(O, P, jnp.float32(0.5), jnp.float32(0.1))
    # decay only where O·P ≥ 0 (same sign, or O == 0)
    expected = -(0.5 * O + 0.5 * 0.1 * P * jnp.array([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(u, expected, rtol=1e-6)


def test_muon_lr_scale_uses_reference_orientation():
    n = 32
    assert optim.muon_lr_scale((2, n, 4 * n)) == 2.0  # c_fc kernel (n, 4n) = reference (4n, n): tall
    assert optim.muon_lr_scale((2, 4 * n, n)) == 1.0  # mlp proj: wide
    assert optim.muon_lr_scale((2, n, n)) == 1.0
    assert optim.muon_lr_scale((1, 32, 2)) == 1.0  # ve_gate kernel (32, Hkv) = reference (Hkv, 32): wide


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape", [(2, 16, 64), (2, 64, 16), (1, 32, 32), (1, 32, 2)])  # Flax (K, fan_in, fan_out)
def test_muon_matches_float64_reference_over_steps(shape, jit):
    """Three fp32 Muon steps on Flax kernels == reference on the transposed (fan_out, fan_in) matrices."""
    rng = np.random.default_rng(3)
    P = jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32)
    tx = optim.muon(0.02, dtype=jnp.float32)
    state = tx.init(P)
    Pr, Mr = np.asarray(P, np.float64).swapaxes(-1, -2), 0.0
    rows, cols = shape[-1], shape[-2]
    Sr = np.zeros((shape[0], rows, 1) if rows >= cols else (shape[0], 1, cols))
    update = jax.jit(tx.update) if jit else tx.update
    for step, (mu, wd) in enumerate([(0.85, 0.2), (0.9, 0.1), (0.95, 0.0)]):
        G = rng.normal(size=shape).astype(np.float32)
        u, state = update(jnp.asarray(G), state, P, lrm=np.float32(1.0), momentum=np.float32(mu), wd=np.float32(wd))
        P = optax.apply_updates(P, u)
        Pr, Mr, Sr = ref_muon_step(G.astype(np.float64).swapaxes(-1, -2), Pr, Mr, Sr, lr=0.02, mu=mu, wd=wd)
        moved = np.linalg.norm(np.asarray(P, np.float64).swapaxes(-1, -2) - Pr) / (0.02 * np.linalg.norm(Pr))
        assert moved < 1e-4, (step, moved)
        np.testing.assert_allclose(np.asarray(state.second_moment).swapaxes(-1, -2), Sr, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 16, 64), (2, 64, 16), (1, 32, 32), (1, 12, 2)])  # Flax (K, fan_in, fan_out)
def test_muon_92d63d4_matches_float64_reference_over_steps(shape):
    """92d63d4's Muon (MuonEq, normaliser 1.01, float32 after Polar Express, Muon+, β2 0.9), fp32 and bf16."""
    variant = recipe.get("92d63d4").muon
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 0.15)):  # bf16: rounding noise of 5-15% (fixtures README)
        rng = np.random.default_rng(7)
        P = jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32)
        tx = optim.muon(0.02, variant.beta2, dtype=dtype, variant=variant)
        state = tx.init(P)
        Pr, Mr = np.asarray(P, np.float64).swapaxes(-1, -2), 0.0
        rows, cols = shape[-1], shape[-2]
        Sr = np.zeros((shape[0], rows, 1) if rows >= cols else (shape[0], 1, cols))
        for step, (mu, wd) in enumerate([(0.85, 0.2), (0.9, 0.1), (0.97, 0.05)]):
            G = (rng.normal(size=shape) * np.geomspace(0.01, 10, shape[-1])).astype(np.float32)  # uneven rows
            u, state = jax.jit(tx.update)(jnp.asarray(G), state, P, lrm=np.float32(1.0), momentum=np.float32(mu),
                                          wd=np.float32(wd))
            start = Pr
            P = optax.apply_updates(P, u)
            Pr, Mr, Sr = ref_muon_step(G.astype(np.float64).swapaxes(-1, -2), Pr, Mr, Sr, lr=0.02, mu=mu, wd=wd,
                                       beta2=0.9, recipe_92d63d4=True)
            moved = np.linalg.norm(np.asarray(P, np.float64).swapaxes(-1, -2) - Pr) / np.linalg.norm(Pr - start)
            assert moved < tol, (dtype, step, moved)
        # float32 after Polar Express: the moments never see bf16 rounding of β2 (0.8984375) or of the update
        assert state.second_moment.dtype == jnp.float32
    # MuonEq's effect is real: without it, the same gradients give a different update
    G = jnp.asarray(rng.normal(size=shape) * np.geomspace(0.01, 10, shape[-1]), jnp.float32)
    plain = dataclasses.replace(variant, muon_eq=False)
    updates = [optim.muon(0.02, 0.9, jnp.float32, variant=v).update(G, tx.init(P), P, lrm=1.0, momentum=0.9, wd=0.0)[0]
               for v in (variant, plain)]
    assert float(jnp.abs(updates[0] - updates[1]).max()) > 1e-4


def test_muon_plus_and_muon_eq_norms():
    X = jnp.asarray(np.random.default_rng(8).normal(size=(3, 24, 40)) * np.geomspace(0.1, 10, 24)[:, None], jnp.float32)
    E = optim.muon_eq(X, jnp.float32)
    rows = jnp.linalg.norm(E, axis=-1)
    np.testing.assert_allclose(rows, jnp.broadcast_to(jnp.linalg.norm(X, axis=(-2, -1))[:, None] / 24 ** 0.5,
                                                      rows.shape), rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(optim.muon_plus(X), axis=(-2, -1)), 24 ** 0.5, rtol=1e-5)
    assert not jnp.any(jnp.isnan(optim.muon_plus(jnp.zeros((2, 4, 4))))) and not jnp.any(
        jnp.isnan(optim.muon_eq(jnp.zeros((2, 4, 4)), jnp.float32)))  # zero-padded stacks stay zero


def test_adamw_decoupled_weight_decay_on_the_scheduled_lr():
    """92d63d4's adamw_step_fused: p·(1 − lr·lrm·wd) before the Adam step; the decay is constant (not scheduled)."""
    rng = np.random.default_rng(9)
    p0 = rng.normal(size=(5, 3)).astype(np.float32)
    tx = optim.adamw(0.1, 0.8, 0.995, weight_decay=0.01)
    state, p = tx.init(jnp.asarray(p0)), jnp.asarray(p0)
    m = v = 0.0
    pr = p0.astype(np.float64)
    for t, lrm in enumerate([1.0, 0.5, 0.25], start=1):
        g = rng.normal(size=p0.shape).astype(np.float32)
        u, state = tx.update(jnp.asarray(g), state, p, lrm=np.float32(lrm), momentum=np.float32(0), wd=np.float32(9))
        p = optax.apply_updates(p, u)
        m, v = 0.8 * m + 0.2 * g, 0.995 * v + 0.005 * g.astype(np.float64) ** 2
        pr = pr * (1 - 0.1 * lrm * 0.01) - (0.1 * lrm / (1 - 0.8**t)) * m / (np.sqrt(v / (1 - 0.995**t)) + 1e-10)
        np.testing.assert_allclose(p, pr, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(jnp.asarray(g), state, None, lrm=1.0, momentum=0.0, wd=0.0)


def test_adamw_matches_reference_formula():
    rng = np.random.default_rng(4)
    p0 = rng.normal(size=(5, 3)).astype(np.float32)
    tx = optim.adamw(0.1, 0.8, 0.95)
    state, p = tx.init(jnp.asarray(p0)), jnp.asarray(p0)
    m = v = 0.0
    pr = p0.astype(np.float64)
    for t, lrm in enumerate([1.0, 0.5, 0.25], start=1):
        g = rng.normal(size=p0.shape).astype(np.float32)
        u, state = tx.update(jnp.asarray(g), state, p, lrm=np.float32(lrm), momentum=np.float32(0), wd=np.float32(0))
        p = optax.apply_updates(p, u)
        m, v = 0.8 * m + 0.2 * g, 0.95 * v + 0.05 * g.astype(np.float64) ** 2
        pr = pr - (0.1 * lrm / (1 - 0.8**t)) * m / (np.sqrt(v / (1 - 0.95**t)) + 1e-10)
        np.testing.assert_allclose(p, pr, rtol=1e-5, atol=1e-6)
    assert int(state.count) == 3


# ------------------------------------------------------------------ the combined optimizer

def test_routing_and_group_learning_rates():
    groups = optim.group_hyperparams(**dict(optimizer_flags(), adam_betas=(0.7, 0.9)), model_dim=1536,
                                     batch_lr_scale=2.0, adamw_groups=R348.adamw_groups, muon_variant=R348.muon)
    s_d = (1536 / 768) ** -0.5
    assert groups["lm_head"]["lr"] == pytest.approx(0.004 * s_d * 2)
    assert groups["wte"]["lr"] == groups["value_embeds"]["lr"] == pytest.approx(0.3 * s_d * 2)
    assert groups["resid_lambdas"]["lr"] == pytest.approx(0.5 * 0.01 * 2)
    assert groups["x0_lambdas"] == {"kind": "adamw", "lr": pytest.approx(1.0), "betas": (0.96, 0.95)}
    assert groups["lm_head"]["betas"] == (0.7, 0.9)
    assert groups["muon"]["lr"] == pytest.approx(0.04)
    labels = optim.param_labels(tiny_params(np.random.default_rng(0)), R348.adamw_groups)
    assert set(jax.tree.leaves(labels["blocks"])) == {"muon"} and labels["wte"] == "wte"
    with pytest.raises(ValueError, match="no optimizer group"):
        optim.param_labels({"wte": 0, "smear_gate": 0}, R348.adamw_groups)


def test_make_optimizer_updates_every_group_and_state_layout():
    params = tiny_params(np.random.default_rng(5))
    tx = optim.make_optimizer(**optimizer_flags(), **R348.optimizer_options(), model_dim=32, weight_decay=0.2)
    state = tx.init(params)
    initial = {"lrm": np.float32(1.0), "momentum": np.float32(0.85), "wd": np.float32(0.2)}
    chex.assert_trees_all_equal(state.schedule, initial)
    muon_state = state.inner.inner_states["muon"].inner_state
    assert muon_state.second_moment["blocks"]["c_fc"].shape == (2, 1, 128)  # per reference row (4n of them)
    assert muon_state.second_moment["blocks"]["mlp_proj"].shape == (2, 128, 1)  # per reference column (4n)
    assert muon_state.second_moment["blocks"]["ve_gate"].shape == (1, 32, 1)  # per reference column (32)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        assert float(jnp.abs(u).max()) > 0, path
    # Adam's first step is lr·sign(g): resid_lambdas lr 0.005
    np.testing.assert_allclose(updates["resid_lambdas"], -0.005, rtol=1e-5)


def test_schedule_changes_never_recompile():
    params = tiny_params(np.random.default_rng(6))
    tx = optim.make_optimizer(**optimizer_flags(), **R348.optimizer_options(), model_dim=32, weight_decay=0.2)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads, values):
        state = optim.set_schedule(state, values)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiles, compiles_per_step = [], []
    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        grads = jax.tree.map(lambda p: 0.01 * jnp.cos(p), params)
        for it in range(6):
            values = optim.schedule_values(it * 97, num_iterations=600, warmup_ratio=0.05, warmdown_ratio=0.5,
                                           final_lr_frac=0.0, weight_decay=0.2)
            # float32 arrays, as the train step gets them (Python floats would be weak-typed: one more compile)
            values = optim.schedule_arrays(values)
            before = len(compiles)
            params, state = step(params, state, grads, values)
            compiles_per_step.append(len(compiles) - before)
            assert float(state.schedule["momentum"]) == pytest.approx(optim.muon_momentum(it * 97))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert step._cache_size() == 1
    assert compiles_per_step == [1, 0, 0, 0, 0, 0], compiles_per_step
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_missing_schedule_values_are_an_error():
    with pytest.raises(KeyError, match="lrm"):
        optim.set_schedule(optim.ScheduleState({}, None), {"momentum": 0.9, "wd": 0.0})
    tx = optim.muon(0.02)
    p = jnp.ones((1, 4, 4))
    with pytest.raises(TypeError, match="schedule values"):
        tx.update(p, tx.init(p), p)


# ------------------------------------------------------------------ schedules (scripts/base_train.py)

def test_lr_multiplier_reference_boundaries():
    N = 8715
    warmdown = round(0.5 * N)
    assert warmdown == 4358  # round(4357.5): half to even
    lrm = lambda it: optim.lr_multiplier(it, N, 0.0, 0.5, 0.0)  # noqa: E731
    assert lrm(0) == 1.0
    assert lrm(N - warmdown) == 1.0
    assert lrm(N - warmdown + 1) == pytest.approx((warmdown - 1) / warmdown)
    assert lrm(N - 1) == 1 / warmdown  # the last update is never at 0
    assert optim.lr_multiplier(N - 1, N, 0.0, 0.5, 0.1) == pytest.approx(1 / warmdown + (1 - 1 / warmdown) * 0.1)


def test_lr_multiplier_warmup_and_no_warmdown():
    assert [optim.lr_multiplier(it, 100, 0.05, 0.5, 0.0) for it in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    # round(2.5) == 2 warmup steps (half to even; half up would give 3)
    assert [optim.lr_multiplier(it, 50, 0.05, 0.0, 0.0) for it in range(3)] == [0.5, 1.0, 1.0]
    assert all(optim.lr_multiplier(it, 10, 0.0, 0.0, 0.0) == 1.0 for it in range(10))


def test_schedules_refuse_steps_past_the_horizon():
    """Past N the warmdown's line goes below zero (gradient ascent) and the weight decay negative: refused, not
    extrapolated; step N itself (the final LR) is fine."""
    N = 100
    assert optim.lr_multiplier(N, N, 0.0, 0.5, 0.0) == 0.0
    for schedule in (lambda it: optim.lr_multiplier(it, N, 0.0, 0.5, 0.0),
                     lambda it: optim.muon_weight_decay(it, N, 0.2),
                     lambda it: optim.muon_weight_decay_cosine(it, N, 0.2),
                     lambda it: optim.schedule_values(it, num_iterations=N, warmup_ratio=0.0, warmdown_ratio=0.5,
                                                      final_lr_frac=0.0, weight_decay=0.2)):
        for it in (N + 1, 3 * N, -1):
            with pytest.raises(ValueError, match=f"step {it} outside the horizon"):
                schedule(it)


def test_muon_momentum_and_weight_decay_schedules():
    assert optim.muon_momentum(0) == 0.85
    assert optim.muon_momentum(150) == pytest.approx(0.90)
    assert optim.muon_momentum(300) == pytest.approx(0.95)
    assert optim.muon_momentum(1000) == pytest.approx(0.95)
    assert optim.muon_weight_decay(0, 1000, 0.2) == 0.2
    assert optim.muon_weight_decay(500, 1000, 0.2) == pytest.approx(0.1)
    assert optim.muon_weight_decay(999, 1000, 0.2) == pytest.approx(0.2 / 1000)
    values = optim.schedule_values(150, num_iterations=1000, warmup_ratio=0.0, warmdown_ratio=0.5,
                                   final_lr_frac=0.0, weight_decay=0.2)
    assert values == pytest.approx({"lrm": 1.0, "momentum": 0.9, "wd": 0.17})


def test_depth_and_batch_scaling():
    expected = {4: 1.8, 12: 0.2, 20: 0.072, 24: 0.05, 26: 0.042604}
    for depth, wd in expected.items():
        assert recipe.depth_scaled_weight_decay(0.2, depth) == pytest.approx(wd, abs=5e-7)
    assert recipe.batch_lr_scale(2**19) == 1.0
    assert recipe.batch_lr_scale(2**17) == pytest.approx(0.5)
    assert recipe.batch_lr_scale(2**21) == pytest.approx(2.0)
