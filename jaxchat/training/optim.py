"""MuonAdamW (nanochat/optim.py MuonAdamW at 348fbb3, and 92d63d4's variant) as an optax transformation, and the schedules.

    r = jaxchat.training.recipe.get("348fbb3")      # the AdamW groups, Muon variant and schedules are the recipe's
    wd_scaled = r.weight_decay_rule(0.2, depth=depth, ...)   # jaxchat.training.plan applies the recipe's transfer rules
    tx = make_optimizer(model_dim=n, **config.optimizer_flags(c), weight_decay=wd_scaled,  # the flags' LRs, betas
                        batch_lr_scale=recipe.batch_lr_scale(B), **r.optimizer_options())
    opt_state = tx.init(params)          # under `with jax.set_mesh(mesh):` (or with out_shardings) on a mesh
    values = schedule_values(it, num_iterations=N, warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0,
                             weight_decay=wd_scaled)                          # {lrm, momentum, wd}: Python floats
    # inside the jitted train step, `values` passed in as float32 arrays (Python floats are weak-typed: 2nd compile):
    opt_state = set_schedule(opt_state, values)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

The per-step values live in the optimizer state (`ScheduleState.schedule`: float32 scalars `lrm` = LR multiplier of
every group, `momentum` = Muon μ, `wd` = Muon weight decay), so a new value is new data, never a recompile.
`tx.init` sets them to step 0 of a schedule without warmup (1.0, 0.85, weight_decay). The inner transforms
(`adamw`, `muon`) take the same values as optax extra args instead, for use without the wrapper.

Routing by each parameter's declared optimizer (jaxchat.model.params): the block matrices → Muon; lm_head, wte,
value_embeds, resid_lambdas, x0_lambdas (+ smear_gate, smear_lambda, backout_lambda in one group at 92d63d4) → the
AdamW group of that name, whose hyperparameters a recipe's table of `AdamWGroup`s gives (jaxchat.training.recipe).
`MuonVariant` selects 92d63d4's Muon changes (MuonEq, Polar Express normaliser 1.01, float32 after
orthogonalisation, Muon+, NorMuon β2 0.9). Block leaves are stacks of Flax kernels
(..., fan_in, fan_out); Muon does its math per matrix on the transposed view, i.e. in the reference orientation
(rows = fan_out, cols = fan_in), so the tall/wide branch, the NorMuon reduction axis and the LR scale follow
nanochat/optim.py muon_step_fused literally. The leading (stack) axes are batch axes only: shard them, never the
matrix axes.

Optimizer state: ScheduleState(schedule, inner=optax.partition state); AdamW `count` (int32) with fp32 `mu`/`nu`
per leaf; Muon fp32 `momentum` and NorMuon `second_moment`, both in the param layout: the second moment is
(..., 1, fan_out) (one statistic per reference row) if fan_out >= fan_in, else (..., fan_in, 1). Only this module
reads that layout: `read_moments` and `write_moments` move the moments in and out of it (nanochat's files,
jaxchat.interop.nanochat_ckpt), and `param_group_fields` gives each group's fields as nanochat's param_groups hold them.
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxchat.model import params as paramslib

ADAMW_EPS = 1e-10
MUON_BETA2 = 0.95
NS_STEPS = 5
# Polar Express coefficients (num_iters=5, safety 2e-2, cushion 2; arXiv 2505.16932), as in the reference.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SCHEDULE_KEYS = ("lrm", "momentum", "wd")


@dataclasses.dataclass(frozen=True)
class AdamWGroup:
    """One AdamW group of `GPT.setup_optimizer`: its LR rule, betas, decoupled wd (its parameters are those
    jaxchat.model.params declares with this group's name as their optimizer).

    lr = flag value (or 1 if lr_flag is None) × lr_factor × (n/768)^-0.5 if dmodel_scaled × batch LR scale if
    batch_scaled; betas None: the --adam-beta1/--adam-beta2 flags. weight_decay is constant (never scheduled).
    """

    name: str
    lr_flag: str | None
    lr_factor: float = 1.0
    dmodel_scaled: bool = True
    batch_scaled: bool = True
    betas: tuple[float, float] | None = None
    weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class MuonVariant:
    """Which Muon: 348fbb3's defaults, or 92d63d4's changes (nanochat/optim.py muon_step_fused at 92d63d4)."""

    beta2: float = MUON_BETA2  # NorMuon
    pe_norm: float = 1.02  # Polar Express divides by ‖X‖_F · pe_norm + 1e-6
    muon_eq: bool = False  # MuonEq: rows scaled to the mean row norm before Polar Express
    float32_after_pe: bool = False  # cast the orthogonalised update (and so every later op) back to float32
    muon_plus: bool = False  # Muon+: ‖O‖_F snapped to √min(rows, cols) after Polar Express


# ---------------------------------------------------------------------------------------------------------------
# Schedules (scripts/base_train.py get_lr_multiplier, get_muon_momentum, get_weight_decay)

def check_within_horizon(it: int, num_iterations: int) -> None:
    """Refuse a step outside [0, num_iterations]: past the horizon the warmdown's line goes on below zero (a negative
    LR multiplier is gradient ascent, nanochat's get_lr_multiplier included) and the weight decay turns negative
    (linear) or back up (cosine). The loop ends at the horizon and refuses a checkpoint past it, so this is a bug."""
    if not 0 <= it <= num_iterations:
        raise ValueError(f"schedule asked for step {it} outside the horizon [0, {num_iterations}]: the LR multiplier "
                         f"would be negative past it")


def lr_multiplier(it: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float, warmup_steps: int = -1) -> float:
    """LR multiplier for 0-based step `it`: linear warmup, constant, linear warmdown to final_lr_frac.

    warmup_steps >= 0 (92d63d4's --warmup-steps) replaces 348fbb3's warmup_ratio."""
    check_within_horizon(it, num_iterations)
    # Python round (half to even), as the reference
    warmup = warmup_steps if warmup_steps >= 0 else round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress * 1.0 + (1 - progress) * final_lr_frac


@dataclasses.dataclass(frozen=True)
class MomentumSchedule:
    """Muon momentum: start → peak linearly over `ramp` steps; then, if `final` is set, peak → final over the LR
    warmdown (scripts/base_train.py get_muon_momentum: 348fbb3 is the default, 92d63d4 is (0.85, 0.97, 400, 0.90))."""

    start: float = 0.85
    peak: float = 0.95
    ramp: int = 300
    final: float | None = None


def muon_momentum(it: int, num_iterations: int = 0, warmdown_ratio: float = 0.0,
                  schedule: MomentumSchedule = MomentumSchedule()) -> float:
    """Muon momentum at step `it` (348fbb3 by default: 0.85 → 0.95 linearly over the first 300 steps)."""
    if it < schedule.ramp:  # the ramp wins over the warmdown where they overlap, as in 92d63d4
        frac = it / schedule.ramp
        return (1 - frac) * schedule.start + frac * schedule.peak
    if schedule.final is not None:
        warmdown = round(warmdown_ratio * num_iterations)
        if it >= num_iterations - warmdown:
            progress = (it - (num_iterations - warmdown)) / warmdown
            return schedule.peak * (1 - progress) + schedule.final * progress
    return schedule.peak


def muon_weight_decay(it: int, num_iterations: int, wd_scaled: float) -> float:
    """Muon weight decay: linear from wd_scaled to 0 over the run (348fbb3)."""
    check_within_horizon(it, num_iterations)
    return wd_scaled * (1 - it / num_iterations)


def muon_weight_decay_cosine(it: int, num_iterations: int, wd_scaled: float) -> float:
    """Muon weight decay: cosine from wd_scaled to 0 over the run (92d63d4 scripts/base_train.py get_weight_decay)."""
    check_within_horizon(it, num_iterations)
    return wd_scaled * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


@dataclasses.dataclass(frozen=True)
class Schedules:
    """The schedule shapes a recipe fixes: Muon momentum and the Muon weight-decay curve."""

    momentum: MomentumSchedule = MomentumSchedule()
    weight_decay: Callable[[int, int, float], float] = muon_weight_decay


def schedule_values(it: int, *, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                    final_lr_frac: float, weight_decay: float, warmup_steps: int = -1,
                    schedules: Schedules = Schedules()) -> dict[str, float]:
    """The per-step values for step `it` (`weight_decay` is the scaled Muon wd): {lrm, momentum, wd}."""
    return {
        "lrm": lr_multiplier(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac, warmup_steps),
        "momentum": muon_momentum(it, num_iterations, warmdown_ratio, schedules.momentum),
        "wd": schedules.weight_decay(it, num_iterations, weight_decay),
    }


class ScheduleState(NamedTuple):
    """Optimizer state of `make_optimizer`: this step's schedule values (float32 scalars) and the inner state."""

    schedule: dict[str, jax.Array]
    inner: Any


def schedule_arrays(values: dict[str, Any]) -> dict[str, jax.Array]:
    """{lrm, momentum, wd} as float32 scalars: what the jitted step takes (and `make_optimizer`'s state holds)."""
    missing = [k for k in SCHEDULE_KEYS if k not in values]
    if missing:
        raise KeyError(f"the schedule needs {list(SCHEDULE_KEYS)} (as schedule_values returns), missing {missing}")
    # Explicit float32: weak-typed or float64 values would change the state's dtype and recompile the step.
    return {k: jnp.asarray(values[k], jnp.float32) for k in SCHEDULE_KEYS}


def set_schedule(opt_state: ScheduleState, values: dict[str, Any]) -> ScheduleState:
    """The state with this step's {lrm, momentum, wd}; call it inside the jitted step with the values as arguments."""
    return opt_state._replace(schedule=schedule_arrays(values))


def _schedule(extra_args: dict[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lrm, momentum, wd) from the extra args of `update`, as float32."""
    missing = [k for k in SCHEDULE_KEYS if k not in extra_args]
    if missing:
        raise TypeError(f"the Muon/AdamW update needs the schedule values {missing} as keyword arguments "
                        f"(make_optimizer's transformation passes them from its state)")
    return tuple(jnp.asarray(extra_args[k], jnp.float32) for k in SCHEDULE_KEYS)


def _lerp(start: jax.Array, end: jax.Array, weight: jax.Array) -> jax.Array:
    """torch.lerp's formula: start + w·(end−start), or end − (1−w)·(end−start) for w ≥ 0.5."""
    diff = end - start
    return jnp.where(weight < 0.5, start + weight * diff, end - diff * (1 - weight))


# ---------------------------------------------------------------------------------------------------------------
# AdamW (nanochat/optim.py adamw_step_fused)

class AdamWState(NamedTuple):
    """Per-leaf step count and fp32 moments."""

    count: jax.Array
    mu: Any
    nu: Any


def adamw(lr: float, b1: float, b2: float, eps: float = ADAMW_EPS,
          weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """The reference's bias-corrected AdamW step; the LR is `lr · lrm` with lrm an update extra arg.

    Decoupled weight decay on the scheduled LR, p·(1 − lr·lrm·wd), before the Adam step (adamw_step_fused)."""

    def init_fn(params):
        zeros = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731
        return AdamWState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None, **extra_args):
        if weight_decay and params is None:
            raise ValueError("AdamW with weight decay needs params: tx.update(grads, state, params, ...)")
        lrm, _, _ = _schedule(extra_args)
        count = state.count + 1
        # The reference fills 0-d float32 tensors and does all scalar math in float32.
        lr_t = jnp.float32(lr) * lrm
        b1_t, b2_t = jnp.float32(b1), jnp.float32(b2)
        step_t = count.astype(jnp.float32)
        bias1, bias2 = 1 - b1_t ** step_t, 1 - b2_t ** step_t
        step_size = lr_t / bias1
        g = jax.tree.map(lambda x: x.astype(jnp.float32), updates)
        mu = jax.tree.map(lambda m, g: _lerp(m, g, 1 - b1_t), state.mu, g)
        nu = jax.tree.map(lambda v, g: _lerp(v, jnp.square(g), 1 - b2_t), state.nu, g)
        new_updates = jax.tree.map(lambda m, v: -step_size * (m / (jnp.sqrt(v / bias2) + jnp.float32(eps))), mu, nu)
        if weight_decay:  # a static setting: groups without decay keep exactly the update above
            decay = lr_t * jnp.float32(weight_decay)
            new_updates = jax.tree.map(lambda u, p: u - p.astype(jnp.float32) * decay, new_updates, params)
        return new_updates, AdamWState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------------------
# Muon with Polar Express and NorMuon (nanochat/optim.py muon_step_fused)

class MuonState(NamedTuple):
    """fp32 momentum buffers (param layout) and NorMuon second moments (reference orientation)."""

    momentum: Any
    second_moment: Any


def _ref_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) = (fan_out, fan_in) of a stacked Flax kernel (..., fan_in, fan_out)."""
    if len(shape) < 2:
        raise ValueError(f"Muon needs matrices (..., fan_in, fan_out), got shape {shape}")
    return shape[-1], shape[-2]


def _second_moment_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One statistic per reference row (fan_out) if rows ≥ cols, else per column (fan_in); in param layout."""
    rows, cols = _ref_shape(shape)
    return (*shape[:-2], 1, rows) if rows >= cols else (*shape[:-2], cols, 1)


def muon_lr_scale(shape: tuple[int, ...]) -> float:
    """sqrt(max(1, fan_out / fan_in)): ×2 for c_fc (4n, n), ×1 for square and wide matrices."""
    rows, cols = _ref_shape(shape)
    return max(1.0, rows / cols) ** 0.5


def polar_express(X_MOI: jax.Array, dtype=jnp.bfloat16, ns_steps: int = NS_STEPS, norm: float = 1.02) -> jax.Array:
    """Approximate orthogonalisation of each matrix (..., rows, cols), computed in `dtype`, returned in `dtype`.

    norm: the normaliser's safety factor, X / (‖X‖_F · norm + 1e-6): 1.02 at 348fbb3, 1.01 at 92d63d4."""
    f32 = jnp.float32
    # float32 matmuls must not silently run as TF32/bf16 passes on GPU; bf16 ones accumulate in float32 anyway.
    precision = jax.lax.Precision.HIGHEST if dtype == f32 else None

    def r(x):  # every reference op returns `dtype`: round after each one (no-op in float32)
        return x.astype(dtype).astype(f32)

    def mm(a, b):
        return r(jnp.matmul(a.astype(dtype), b.astype(dtype), precision=precision, preferred_element_type=f32))

    # Values are float32 holding `dtype` numbers; rounding per op like eager PyTorch matches the bf16 reference
    # fixtures about 3x better than one rounding per fused chain (max moved 0.08 vs 0.25 on ref_d3 step 1).
    X = r(X_MOI.astype(f32))
    fro = r(jnp.sqrt(jnp.sum(jnp.square(X), axis=(-2, -1), keepdims=True)))
    X = r(X / r(r(fro * norm) + 1e-6))
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        Xt = jnp.swapaxes(X, -1, -2)
        A = mm(Xt, X) if tall else mm(X, Xt)  # the small Gram matrix: cols×cols if tall, rows×rows otherwise
        B = r(r(b * A) + r(c * mm(A, A)))
        X = r(r(a * X) + (mm(X, B) if tall else mm(B, X)))
    return X.astype(dtype)


def muon_eq(X_MOI: jax.Array, dtype) -> jax.Array:
    """MuonEq (nanochat 92d63d4 muon_step_fused): each row scaled to ‖X‖_F/√rows; norms in float32, the factor and
    the product in `dtype` (rows = the reference's rows, fan_out)."""
    f32 = jnp.float32
    X = X_MOI.astype(dtype).astype(f32)
    target = jnp.sqrt(jnp.sum(jnp.square(X), axis=(-2, -1), keepdims=True)) / X.shape[-2] ** 0.5
    row_norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(X), axis=-1, keepdims=True)), 1e-6)
    return (X * (target / row_norm).astype(dtype).astype(f32)).astype(dtype)


def muon_plus(O_MOI: jax.Array) -> jax.Array:
    """Muon+ (nanochat 92d63d4): each matrix's Frobenius norm snapped to √min(rows, cols), an exactly
    semi-orthogonal matrix's; the norm in float32, the factor in O's dtype."""
    rows, cols = O_MOI.shape[-2:]
    O = O_MOI.astype(jnp.float32)
    current = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(O), axis=(-2, -1), keepdims=True)), 1e-6)
    return (O * (min(rows, cols) ** 0.5 / current).astype(O_MOI.dtype).astype(jnp.float32)).astype(O_MOI.dtype)


def normuon(O_MOI: jax.Array, S: jax.Array, beta2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rescale rows (or columns) of O by the factored second moment, keeping ‖O‖_F; returns (O, new S)."""
    f32 = jnp.float32
    rows, cols = O_MOI.shape[-2:]
    axis = -1 if rows >= cols else -2
    n_red = O_MOI.shape[axis]
    v_mean = jnp.mean(jnp.square(O_MOI.astype(f32)), axis=axis, keepdims=True)
    v_norm = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * n_red)
    S = _lerp(S, v_mean, 1 - beta2)
    step = jax.lax.rsqrt(jnp.maximum(S, 1e-10))
    v_norm_new = jnp.sqrt(jnp.sum(v_mean * n_red * jnp.square(step), axis=(-2, -1), keepdims=True))
    scale = step * (v_norm / jnp.maximum(v_norm_new, 1e-10))
    O = (O_MOI.astype(f32) * scale.astype(O_MOI.dtype).astype(f32)).astype(O_MOI.dtype)
    return O, S


def muon_matrix_update(O_MOI: jax.Array, P_MOI: jax.Array, lr_eff: jax.Array, wd: jax.Array) -> jax.Array:
    """−(lr_eff·O + lr_eff·wd·P·mask) with the cautious mask O⊙P ≥ 0 (lr_eff, wd already in O's dtype)."""
    f32 = jnp.float32
    mask = (O_MOI.astype(f32) * P_MOI) >= 0
    lr_O = (lr_eff.astype(f32) * O_MOI.astype(f32)).astype(O_MOI.dtype).astype(f32)  # bf16 product in nanochat's muon_step_fused
    decay = (lr_eff.astype(f32) * wd.astype(f32)).astype(O_MOI.dtype).astype(f32) * P_MOI * mask
    return -(lr_O + decay)


def spread_stacks(arrays: tuple[jax.Array, ...], sharding) -> tuple[jax.Array, ...]:
    """Zero-pad the leading (stack) axis to a multiple of `sharding`'s shards and split it over them, so every device
    orthogonalises whole matrices whatever the depth (nanochat/optim.py DistMuonAdamW._compute_muon pads its stacks the same way).
    Zero matrices stay zero through Polar Express and NorMuon; callers cut the padding off the results."""
    if sharding is None or arrays[0].ndim < 3:
        return arrays
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    pad = -arrays[0].shape[0] % math.prod(sharding.mesh.shape[a] for a in axes)
    return tuple(jax.lax.with_sharding_constraint(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)), sharding)
                 for a in arrays)


def muon(lr: float, beta2: float = MUON_BETA2, dtype=jnp.bfloat16, ns_steps: int = NS_STEPS,
         stack_sharding=None, variant: MuonVariant = MuonVariant()) -> optax.GradientTransformationExtraArgs:
    """Muon over a tree of stacked Flax kernels; extra args lrm, momentum, wd (nanochat/optim.py muon_step_fused, with its bf16 quirks).

    stack_sharding (mesh.muon_stack_sharding): where the orthogonalisation runs; None: wherever the inputs live.
    variant: 92d63d4's options (its beta2 is ignored here: `beta2` is the group's).
    """
    dtype = jnp.dtype(dtype)
    # 348fbb3 keeps Polar Express's dtype to the end, so NorMuon and the update (and their hyperparameters) are
    # rounded to it; 92d63d4 casts back to the parameters' float32 right after Polar Express.
    out_dtype = jnp.dtype(jnp.float32) if variant.float32_after_pe else dtype

    def init_fn(params):
        return MuonState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                         jax.tree.map(lambda p: jnp.zeros(_second_moment_shape(p.shape), jnp.float32), params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("Muon needs params for its cautious weight decay: tx.update(grads, state, params, ...)")
        lrm, momentum, wd = _schedule(extra_args)
        # muon_step_fused casts the 0-d hyperparameters to the update's dtype after Polar Express (bf16 rounding).
        beta2_t = jnp.float32(beta2).astype(out_dtype).astype(jnp.float32)
        wd_t = wd.astype(out_dtype)

        def one(g, M, S, p):
            g = g.astype(jnp.float32)
            M = _lerp(M, g, 1 - momentum)
            U = _lerp(g, M, momentum)  # Nesterov: (1−μ)·g + μ·M
            # Reference orientation (rows = fan_out, cols = fan_in): transpose the matrix axes only.
            U_MOI, P_MOI, S_MOI = (jnp.swapaxes(x, -1, -2) for x in (U, p.astype(jnp.float32), S))
            stacked = U_MOI.shape[0]  # before padding: results are cut back to it
            U_MOI, P_MOI, S_MOI = spread_stacks((U_MOI, P_MOI, S_MOI), stack_sharding)
            if variant.muon_eq:
                U_MOI = muon_eq(U_MOI, dtype)
            O_MOI = polar_express(U_MOI, dtype, ns_steps, variant.pe_norm).astype(out_dtype)
            if variant.muon_plus:
                O_MOI = muon_plus(O_MOI)
            O_MOI, S_MOI = normuon(O_MOI, S_MOI, beta2_t)
            lr_eff = (jnp.float32(lr * muon_lr_scale(p.shape)) * lrm).astype(out_dtype)
            u_MOI = muon_matrix_update(O_MOI, P_MOI, lr_eff, wd_t)[:stacked]
            return jnp.swapaxes(u_MOI, -1, -2).astype(p.dtype), M, jnp.swapaxes(S_MOI[:stacked], -1, -2)

        out = jax.tree.map(one, updates, state.momentum, state.second_moment, params)
        leaves_of = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)  # noqa: E731
        return leaves_of(0), MuonState(leaves_of(1), leaves_of(2))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------------------
# The combined optimizer (nanochat/gpt.py GPT.setup_optimizer)

def group_of(p: paramslib.Param | None, key: str, groups: tuple[AdamWGroup, ...]) -> str:
    """Optimizer group of the parameter declared as `p` (`key`: its path, for the error): its declared optimizer,
    'muon' or one of `groups`' names."""
    names = {g.name for g in groups} | {"muon"}
    if p is None or p.optimizer not in names:
        raise ValueError(f"no optimizer group for parameter {key}"
                         + (f" (it needs AdamW group {p.optimizer!r})" if p else " (not in jaxchat.model.params.PARAMS)")
                         + f": this recipe's groups are {sorted(names)}")
    return p.optimizer


def param_labels(params: dict, groups: tuple[AdamWGroup, ...]) -> dict:
    """Optimizer group of every leaf (`group_of`)."""
    def label(path, _):
        key = paramslib.path_of(path)
        return group_of(paramslib.declaring(key), key, groups)
    return jax.tree_util.tree_map_with_path(label, params)


def group_hyperparams(*, model_dim: int, embedding_lr: float, unembedding_lr: float, matrix_lr: float,
                      scalar_lr: float, adam_betas: tuple[float, float], batch_lr_scale: float = 1.0,
                      adamw_groups: tuple[AdamWGroup, ...], muon_variant: MuonVariant) -> dict[str, dict[str, Any]]:
    """Base LR and betas of each group (before the LR multiplier), in the reference's group order. The learning
    rates and betas are the flags' (jaxchat.training.config.optimizer_flags, whose defaults are nanochat's)."""
    flags = {"embedding_lr": embedding_lr, "unembedding_lr": unembedding_lr, "scalar_lr": scalar_lr}
    dmodel_lr_scale = (model_dim / 768) ** -0.5
    groups = {}
    for g in adamw_groups:
        lr = flags[g.lr_flag] * g.lr_factor if g.lr_flag else g.lr_factor
        lr = lr * dmodel_lr_scale if g.dmodel_scaled else lr
        lr = lr * batch_lr_scale if g.batch_scaled else lr
        groups[g.name] = {"kind": "adamw", "lr": lr, "betas": tuple(g.betas or adam_betas)}
    groups["muon"] = {"kind": "muon", "lr": matrix_lr * batch_lr_scale, "beta2": muon_variant.beta2}
    return groups


def make_optimizer(*, model_dim: int, embedding_lr: float, unembedding_lr: float, matrix_lr: float,
                   scalar_lr: float, adam_betas: tuple[float, float], weight_decay: float = 0.0, batch_lr_scale: float = 1.0, muon_dtype=jnp.bfloat16,
                   muon_stack_sharding=None, adamw_groups: tuple[AdamWGroup, ...], muon_variant: MuonVariant,
                   schedules: Schedules) -> optax.GradientTransformationExtraArgs:
    """MuonAdamW for jaxchat's parameter tree; per-step values via `set_schedule` (see the module docstring).

    `weight_decay` is the scaled Muon wd; it is only the initial `wd` of the state (step 0 of its schedule).
    The learning rates and betas: the flags' (jaxchat.training.config.optimizer_flags).
    `muon_stack_sharding`: mesh.muon_stack_sharding(mesh) on a mesh, so Muon's work is split, never repeated.
    adamw_groups, muon_variant, schedules: the recipe's (jaxchat.training.recipe Recipe.optimizer_options()).
    """
    groups = group_hyperparams(model_dim=model_dim, embedding_lr=embedding_lr, unembedding_lr=unembedding_lr,
                               matrix_lr=matrix_lr, scalar_lr=scalar_lr, adam_betas=adam_betas,
                               batch_lr_scale=batch_lr_scale, adamw_groups=adamw_groups, muon_variant=muon_variant)
    transforms = {g.name: adamw(groups[g.name]["lr"], *groups[g.name]["betas"], weight_decay=g.weight_decay)
                  for g in adamw_groups}
    transforms["muon"] = muon(groups["muon"]["lr"], groups["muon"]["beta2"], muon_dtype,
                              stack_sharding=muon_stack_sharding, variant=muon_variant)
    inner = optax.partition(transforms, lambda params: param_labels(params, adamw_groups))
    initial = {"lrm": 1.0, "momentum": muon_momentum(0, schedule=schedules.momentum), "wd": weight_decay}

    def init_fn(params):
        return ScheduleState(schedule_arrays(initial), inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # the schedule comes from the state
        updates, inner_state = inner.update(updates, state.inner, params, **state.schedule)
        return updates, ScheduleState(state.schedule, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def param_group_fields(hyperparams: dict[str, dict[str, Any]], adamw_groups: tuple[AdamWGroup, ...], lrm: float,
                       momentum: float, wd: float) -> dict[str, dict[str, Any]]:
    """Each group's fields as nanochat's MuonAdamW param_groups hold them at a step (nanochat/gpt.py setup_optimizer
    and base_train's per-step updates at 348fbb3: lr = initial_lr x lrm, Muon momentum and weight decay set), by
    jaxchat label; `hyperparams`: group_hyperparams', lrm, momentum, wd: that step's schedule values."""
    weight_decay = {g.name: g.weight_decay for g in adamw_groups}  # AdamW's is constant
    out = {}
    for label, g in hyperparams.items():
        if g["kind"] == "adamw":
            out[label] = dict(kind="adamw", lr=g["lr"] * lrm, betas=list(g["betas"]), eps=ADAMW_EPS,
                              weight_decay=weight_decay[label], initial_lr=g["lr"])
        else:
            out[label] = dict(kind="muon", lr=g["lr"] * lrm, momentum=float(momentum), ns_steps=NS_STEPS,
                              beta2=g["beta2"], weight_decay=float(wd), initial_lr=g["lr"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# The state's layout, read and written by moment: ScheduleState(schedule, inner=optax.partition's state), whose
# inner_states[label].inner_state is that group's AdamWState or MuonState (leaves optax masks out are None when
# restored without a target)

# Each moment field of AdamWState and MuonState: which of the two moments it is.
MOMENTS = {"mu": "first", "momentum": "first", "nu": "second", "second_moment": "second"}


def read_moments(opt: dict) -> tuple[dict, dict, dict[str, int]]:
    """(first moments, second moments, AdamW step count per group label) of an optimizer state restored without a
    target (dicts), the moments as parameter-shaped trees."""
    moments, counts = {"first": [], "second": []}, {}
    for label, group in opt["inner"]["inner_states"].items():
        state = group["inner_state"]
        for field, moment in MOMENTS.items():
            if field in state:
                moments[moment].append(state[field])
        if "count" in state:
            counts[label] = int(state["count"])
    return _merge(moments["first"]), _merge(moments["second"]), counts


def _merge(trees: list) -> dict:
    """One parameter-shaped tree from masked ones (each leaf present in exactly one)."""
    out = {}
    for tree in trees:
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = _merge([out.get(k, {}), v])
            elif v is not None:
                out[k] = np.asarray(v)
    return out


def write_moments(opt_state, targets, moments: dict, place: Callable):
    """`opt_state` with every moment leaf, and the AdamW step counts, set from `moments` ({"first", "second":
    parameter-shaped trees, "count": int}) as place(value, that leaf's target in `targets`); the schedule values
    kept."""
    def leaf(path, target, fresh):
        names = key_names(path)
        if "inner_state" not in names:
            return fresh
        field, rest = names[names.index("inner_state") + 1], names[names.index("inner_state") + 2:]
        if field == "count":
            return place(np.asarray(moments["count"]), target)
        value = moments[MOMENTS[field]]
        for k in rest:
            value = value[k]
        return place(value, target)
    return jax.tree_util.tree_map_with_path(leaf, targets, opt_state)


def key_names(path) -> tuple:
    """A jax tree key path as its keys, field names and indices."""
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)
