"""Run jaxchat on a reference fixture and write what it computes, in the fixture's names and layouts.

    python -m jaxchat.parity FIXTURE.npz --out OUT.npz

Reads `config/*`, `param/*`, `idx`, `targets` (format: shared/fixtures/README.md) and writes `loss`, `logits` and
`grad/<name>` computed by jaxchat in float32 on the current backend.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxchat.common import run_main
from jaxchat.convert import from_reference, load_params, read_reference_npz, to_reference
from jaxchat.model import GPT, GPTConfig


def model_from_reference(config: GPTConfig, state: dict[str, np.ndarray], compute_dtype=jnp.float32) -> GPT:
    """A jaxchat GPT holding the reference's weights."""
    model = GPT(config, rngs=nnx.Rngs(0), compute_dtype=compute_dtype)
    load_params(model, from_reference(state, config))
    return model


def loss_and_grads(model: GPT, idx: np.ndarray, targets: np.ndarray) -> tuple[jax.Array, jax.Array, dict]:
    """(mean loss, logits, gradient tree) for one batch, jitted."""
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(params, idx, targets):
        def loss_fn(params):
            return nnx.merge(graphdef, params)(idx, targets)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, nnx.merge(graphdef, params)(idx), grads

    loss, logits, grads = run(params, jnp.asarray(idx, jnp.int32), jnp.asarray(targets, jnp.int32))
    return loss, logits, nnx.to_pure_dict(grads)


def compute(fixture_path: str) -> dict[str, np.ndarray]:
    """Everything jaxchat computes for a fixture, keyed as in the fixture."""
    config, state, data = read_reference_npz(fixture_path)
    model = model_from_reference(config, state)
    loss, logits, grads = loss_and_grads(model, data["idx"], data["targets"])
    out = {"loss": np.asarray(loss, np.float64), "logits": np.asarray(logits)}
    out.update({f"grad/{k}": v for k, v in to_reference(jax.tree.map(np.asarray, grads), config).items()})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixture", help="reference fixture .npz (config/*, param/*, idx, targets, ...)")
    parser.add_argument("--out", required=True, help="where to write jaxchat's results (.npz)")
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity, no TF32/bf16 passes
    out = compute(args.fixture)
    np.savez(args.out, **out)
    print(f"wrote {len(out)} arrays to {args.out} (loss {float(out['loss']):.6f})")


if __name__ == "__main__":
    run_main(main)
