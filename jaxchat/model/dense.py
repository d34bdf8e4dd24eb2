"""The dense layers' matmul: x @ w in x's (compute) dtype, the float32 master weight cast per use like torch autocast,
the output named for the --remat policies ("dense"; "mlp_up" for the MLP's up-projection).

Three forms, one chosen per model by `choose`: autodiff's, the same with the weight gradient's operands ordered for
XLA:CPU's GEMM, and fp8 (jaxchat.model.fp8) for the layers nanochat converts.
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxchat.model import fp8 as fp8lib


def _einsum(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...i,io->...o", x, w.astype(x.dtype))


def matmul(x: jax.Array, w: jax.Array, name: str = "dense") -> jax.Array:
    """x @ w with autodiff's gradients."""
    return checkpoint_name(_einsum(x, w), name)


def cpu_matmul(x: jax.Array, w: jax.Array, name: str = "dense") -> jax.Array:
    """x @ w with the weight gradient's operands ordered for XLA:CPU (_cpu_ordered)."""
    return checkpoint_name(_cpu_ordered(x, w), name)


@jax.custom_vjp
def _cpu_ordered(x: jax.Array, w: jax.Array) -> jax.Array:
    return _einsum(x, w)


def _cpu_ordered_fwd(x, w):
    return _cpu_ordered(x, w), (x, w)


def _cpu_ordered_bwd(residuals, g):
    """Autodiff's gradients, with the weight gradient's operands ordered for XLA:CPU: its GEMM takes the left
    operand with the contracted (token) axis minor, so that operand is copied transposed first; make it the narrower
    of x and g and transpose the small (i, o) result instead. Autodiff's order transposes g: for the lm_head that is
    the whole (tokens, vocab) logits' gradient, the costliest op of a d4 CPU step."""
    x, w = residuals
    dx = jnp.einsum("...o,io->...i", g, w.astype(g.dtype))
    if x.shape[-1] <= g.shape[-1]:
        dw = jnp.einsum("...i,...o->io", x, g)
    else:
        dw = jnp.einsum("...o,...i->oi", g, x).T
    return dx, dw.astype(w.dtype)


_cpu_ordered.defvjp(_cpu_ordered_fwd, _cpu_ordered_bwd)


def _fp8_or(fallback, x: jax.Array, w: jax.Array, name: str = "dense") -> jax.Array:
    """x @ w in fp8 for the layers nanochat converts (jaxchat.model.fp8.qualifies), `fallback` for the others
    (gates)."""
    return checkpoint_name(fp8lib.matmul(x, w), name) if fp8lib.qualifies(*w.shape) else fallback(x, w, name)


def choose(backend, fp8: bool = False):
    """The dense matmul of a model on `backend`: fp8 where it qualifies with fp8 on; the CPU-ordered weight gradient
    on CPU only (XLA:GPU and XLA:TPU choose their GEMMs' layouts themselves)."""
    base = cpu_matmul if backend.platform == "cpu" else matmul
    return functools.partial(_fp8_or, base) if fp8 else base
