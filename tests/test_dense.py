"""The dense layers' matmul: the CPU-ordered weight gradient is autodiff's; each backend's choice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.model import dense
from jaxchat.runtime import backend


@pytest.mark.parametrize("n_in, n_out", [(16, 48), (48, 16)])  # both operand orders of the weight gradient
def test_dense_matmul_gradients_are_autodiffs(n_in, n_out):
    x, w, g = (jax.random.normal(key, shape) for key, shape in zip(jax.random.split(jax.random.key(1), 3),
                                                                   ((2, 5, n_in), (n_in, n_out), (2, 5, n_out))))
    ours = jax.vjp(dense.cpu_matmul, x, w)[1](g)
    plain = jax.vjp(lambda x, w: jnp.einsum("...i,io->...o", x, w), x, w)[1](g)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_choice_per_backend():
    """CPU gets the CPU-ordered gradient, other platforms autodiff's; fp8 wraps the platform's for the gates."""
    cpu = backend.local("float32")
    gpu = dataclasses.replace(cpu, platform="gpu")
    assert dense.choose(cpu) is dense.cpu_matmul and dense.choose(gpu) is dense.matmul
    assert dense.choose(gpu, fp8=True).args == (dense.matmul,)
