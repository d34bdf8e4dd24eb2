"""Tensorwise dynamic-scaled fp8 matmuls for training (`--fp8`), as nanochat/fp8.py at 92d63d4 computes them.

Per operand and per call: amax = max |x| in float32, scale = FP8_MAX / max(amax, 1e-12), q = fp8(clip(x * scale)),
inverse scale 1 / scale. Forward: the input (compute dtype) and the float32 master weight go to e4m3; backward: the
output gradient goes to e5m2, and grad_input and grad_weight are computed from the fp8 operands saved by the forward.

Each matmul multiplies the fp8 operands themselves into the compute dtype and scales the product afterwards (_dot).
Checked by compiling the train step for 8 H100s (jaxchat.aot, tests/test_aot.py): every qualifying layer's forward
GEMM and both backward GEMMs become `__cublas$lt$matmul$f8` calls writing bf16, the forward at operand precision
DEFAULT (fast accumulation, like `_scaled_mm(use_fast_accum=True)`), the backward at HIGHEST; not run on a GPU yet.
XLA may merge GEMMs that share an fp8 operand (q, k and v's at width 768) into one fp8 GEMM. Elsewhere (CPU, A100)
the same quantised numbers are multiplied in float32: the same results, no speed-up.

Scales are per data-parallel shard, like each nanochat rank's (no cross-device amax): under a mesh context whose data
axes split the batch, the activation and gradient quantisation run inside a shard_map over those axes (in the train
step, already per device: jaxchat.training.step.gradient_sum). The weight's amax is over the whole weight (with FSDP,
the train step gathers it whole first; under GSPMD, GSPMD reduces it over the shards).
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxchat.model import params
from jaxchat.model.mesh import data_shard_axes

E4M3 = jnp.float8_e4m3fn  # input and weight: more mantissa, max 448
E5M2 = jnp.float8_e5m2  # output gradient: more range, max 57344
EPS = 1e-12  # nanochat/fp8.py EPS: the amax floor (an all-zero tensor)


def qualifies(n_in: int, n_out: int) -> bool:
    """Whether a dense layer runs in fp8: both sizes multiples of 16, the smaller >= 128 (nanochat base_train.py
    fp8_module_filter), so q, k, v, both projections, c_fc and lm_head do, the VE and smear gates do not."""
    return n_in % 16 == 0 and n_out % 16 == 0 and min(n_in, n_out) >= 128


def qualifying_matmuls(config) -> int:
    """The dense-layer matmuls of one forward pass that run in fp8 under --fp8: each matmul weight of PARAMS (a
    "linear" layout: nanochat's Linear modules) that qualifies, once per layer it is stacked over."""
    return sum((len(p.layers(config)) if p.per_layer else 1) * qualifies(*p.shape_for(config)[-2:])
               for p in params.declared(config) if p.linear)


@functools.lru_cache(maxsize=None)
def _scale_constants(fp8_dtype) -> tuple[float, np.float32, np.float32]:
    """(FP8_MAX, the smallest float32 amax that is >= EPS, the scale of an amax below it).

    nanochat computes float32(FP8_MAX / float64(amax).clamp(min=1e-12)). For a float32 amax >= 1e-12 that equals the
    float32 division FP8_MAX / amax (a quotient of two short floats is never within a float64 rounding of a float32
    rounding boundary unless exactly on it), so only the floor needs float64, here on the host.
    """
    fp8_max = float(ml_dtypes.finfo(fp8_dtype).max)
    floor = np.float32(EPS)
    if float(floor) < EPS:
        floor = np.nextafter(floor, np.float32(np.inf))
    return fp8_max, floor, np.float32(fp8_max / EPS)


def quantise(x: jax.Array, fp8_dtype) -> tuple[jax.Array, jax.Array]:
    """(q, inverse scale): x in fp8 with one dynamic scale for the whole tensor (nanochat/fp8.py `_to_fp8`)."""
    fp8_max, floor, scale_at_floor = _scale_constants(fp8_dtype)
    # |x| and its max are exact in x's own dtype, so this is the float32 amax, from one read of x (no float32 |x|
    # written out for the reduction to read back)
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    # amax < floor, not >=: a NaN amax gives a NaN scale, as torch's clamp propagates it
    scale = jnp.where(amax < floor, scale_at_floor, jnp.float32(fp8_max) / amax)
    q = jnp.clip(x.astype(jnp.float32) * scale, -fp8_max, fp8_max).astype(fp8_dtype)  # saturate, round to even
    return q, (1.0 / scale).astype(jnp.float32)


def _dot(q_a, inv_a, q_b, inv_b, contract: tuple[int, int], out_dtype, precision) -> jax.Array:
    """(q_a * inv_a) . (q_b * inv_b) in out_dtype: the fp8 operands multiplied and accumulated in float32 and written
    in out_dtype by the GEMM, then scaled by inv_a * inv_b in float32 and rounded to out_dtype.

    Compiled for an H100 (jaxchat.aot) the product is one fp8 cuBLASLt GEMM writing bf16, and the scaling fuses into
    whatever reads it. Dequantising the operands first (convert(q) * inv) also makes an fp8 GEMM, but one that writes
    float32 (a float32 x float32 -> bf16 GEMM has no cuBLASLt kernel), read back by a separate rounding pass.
    In bf16, the product is rounded twice (before and after the scaling) where torch's _scaled_mm rounds once: at most
    half a bf16 step more, within the fp8 fixture's tolerance (tests/test_fp8.py)."""
    raw = jax.lax.dot_general(q_a, q_b, ((contract[:1], contract[1:]), ((), ())), precision=precision,
                              preferred_element_type=out_dtype)
    return (raw.astype(jnp.float32) * (inv_a * inv_b)).astype(out_dtype)


def _forward_local(x_Ri, q_w, inv_w):
    """One shard's forward: (y (R, o) in x's dtype, q_x, inverse scale of x as shape (1,))."""
    q_x, inv_x = quantise(x_Ri, E4M3)
    y = _dot(q_x, inv_x, q_w, inv_w, (1, 0), x_Ri.dtype, jax.lax.Precision.DEFAULT)
    return y, q_x, inv_x[None]


def _backward_local(g_Ro, q_x, inv_x, q_w, inv_w):
    """One shard's backward: (grad_x (R, i) in g's dtype, this shard's grad_w (1, i, o) in float32)."""
    q_g, inv_g = quantise(g_Ro, E5M2)
    highest = jax.lax.Precision.HIGHEST  # no fast accumulation in the backward GEMMs
    grad_x = _dot(q_g, inv_g, q_w, inv_w, (1, 1), g_Ro.dtype, highest)
    grad_w = _dot(q_x, inv_x[0], q_g, inv_g, (0, 0), g_Ro.dtype, highest)  # bf16 like _scaled_mm's out_dtype
    return grad_x, grad_w.astype(jnp.float32)[None]


def _per_shard(fn, in_specs: tuple, out_specs: tuple):
    """fn run once per data-parallel shard: 'rows' marks arrays split over the data axes on their first dimension
    (per-shard scalars travel as shape (1,)), 'whole' arrays every shard sees entirely."""
    axes = data_shard_axes()
    if not axes:
        return fn
    spec = {"rows": P(axes), "whole": P()}
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=tuple(spec[s] for s in in_specs),
                         out_specs=tuple(spec[s] for s in out_specs))


def _fp8_matmul_fwd(x, w_io):
    q_w, inv_w = quantise(w_io, E4M3)  # the float32 master weight, amax over all of it
    x_Ri = x.reshape(-1, x.shape[-1])
    y, q_x, inv_x = _per_shard(_forward_local, ("rows", "whole", "whole"), ("rows", "rows", "rows"))(x_Ri, q_w, inv_w)
    return y.reshape(*x.shape[:-1], w_io.shape[1]), (q_x, inv_x, q_w, inv_w)


def _fp8_matmul_bwd(residuals, g):
    q_x, inv_x, q_w, inv_w = residuals
    g_Ro = g.reshape(-1, g.shape[-1])
    grad_x, grad_w_Sio = _per_shard(_backward_local, ("rows",) * 3 + ("whole",) * 2, ("rows", "rows"))(
        g_Ro, q_x, inv_x, q_w, inv_w)
    return grad_x.reshape(*g.shape[:-1], q_w.shape[0]), grad_w_Sio.sum(axis=0)  # shards' weight gradients summed


@jax.custom_vjp
def matmul(x: jax.Array, w_io: jax.Array) -> jax.Array:
    """x @ w_io in fp8, output in x's (compute) dtype; w_io is the float32 master weight in (in, out) layout."""
    return _fp8_matmul_fwd(x, w_io)[0]


matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def no_speedup_note(backend) -> str | None:
    """One line for a run with --fp8 on a backend (jaxchat.runtime.backend) without fp8 GEMMs; None where it has
    them."""
    if backend.fp8_gemms:
        return None
    return (f"--fp8: {backend.device_kind} ({backend.platform}) has no fp8 matmuls; the same fp8 quantisation runs, "
            f"multiplied in float32, so it gives no speed-up here")


def unit_fixture_outputs(x_Ri: np.ndarray, w_oi: np.ndarray, go_Ro: np.ndarray) -> dict[str, np.ndarray]:
    """What nanochat's fp8 unit fixture records, computed by jaxchat: x and go in bfloat16, w the float32 weight in
    torch's (out, in) layout; quantised operands as uint8 bit patterns, in the fixture's layouts."""
    x, go = jnp.asarray(x_Ri, jnp.bfloat16), jnp.asarray(go_Ro, jnp.bfloat16)
    w_io = jnp.asarray(w_oi, jnp.float32).T
    y, vjp = jax.vjp(matmul, x, w_io)
    grad_x, grad_w_io = vjp(go)
    _, (q_x, inv_x, q_w_io, inv_w) = _fp8_matmul_fwd(x, w_io)  # the operands the matmul saved for its backward
    q_go, inv_go = quantise(go, E5M2)  # as its backward quantises the output gradient
    bits = lambda q: np.asarray(q).view(np.uint8)
    f32 = lambda a: np.asarray(a, np.float32)
    return dict(q_x=bits(q_x), q_w=bits(q_w_io.T), q_go=bits(q_go), inv_x=f32(inv_x[0]), inv_w=f32(inv_w),
                inv_go=f32(inv_go), y=f32(y), grad_x=f32(grad_x), grad_w=f32(grad_w_io.T))
