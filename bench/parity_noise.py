"""How far float32 rounding noise alone moves a fixture's free-running MuonAdamW step losses.

Runs the fixture's three steps as tests/test_optim_parity.py does (float32 matmuls), once as is and then with every
gradient multiplied by (1 + 2^-24 * N(0, 1)), half a float32 rounding step, per seed; prints each run's step-loss
errors against the reference. A loss bound below the spread of the noisy runs tests rounding, not the code: this is
where test_optim_parity's HEAD_FREE_LOSS for the bfloat16-Muon fixture comes from.

    python bench/parity_noise.py --fixture nanochat_head_d4_bf16muon.npz --seeds 5
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxchat import parity
from jaxchat.interop.convert import model_from_reference, read_reference_npz
from jaxchat.runtime import cli
from jaxchat.runtime.common import UserError
from jaxchat.training import optim

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures")


def noisy_steps(path: str, seeds: int) -> list[list[float]]:
    """Per run (run 0 without noise): the |step loss - reference| of the fixture's three steps."""
    jax.config.update("jax_default_matmul_precision", "highest")
    config, state, data = read_reference_npz(path)
    graphdef, params0 = nnx.split(model_from_reference(config, state), nnx.Param)
    params0 = nnx.to_pure_dict(params0)
    tx, values = parity.optimizer_from_settings(json.loads(str(data["opt/json"])), config.n_embd, config.recipe)
    values = {k: np.float32(v) for k, v in values.items()}

    @jax.jit
    def step(params, opt_state, idx, targets, key, rel):
        loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(idx, targets))(params)
        leaves, tree = jax.tree.flatten(grads)
        keys = jax.random.split(key, len(leaves))
        grads = jax.tree.unflatten(tree, [g * (1 + rel * jax.random.normal(k, g.shape)) for g, k in zip(leaves, keys)])
        updates, opt_state = tx.update(grads, optim.set_schedule(opt_state, values), params)
        return loss, optax.apply_updates(params, updates), opt_state

    runs = []
    for seed in range(seeds + 1):
        params, opt_state, errors = params0, tx.init(params0), []
        for k in (1, 2, 3):
            loss, params, opt_state = step(params, opt_state, jnp.asarray(data[f"step{k}_idx"], jnp.int32),
                                           jnp.asarray(data[f"step{k}_targets"], jnp.int32), jax.random.key(seed),
                                           0.0 if seed == 0 else 2.0 ** -24)
            errors.append(abs(float(loss) - float(data[f"step{k}_loss"])))
        runs.append(errors)
    return runs


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixture", default="nanochat_head_d4_bf16muon.npz", help="a file in ../shared/fixtures, or a path")
    p.add_argument("--seeds", type=int, default=5, help="noisy runs")
    a = p.parse_args(argv)
    path = a.fixture if os.path.exists(a.fixture) else os.path.join(FIXTURES, a.fixture)
    if not os.path.exists(path):
        raise UserError(f"--fixture={a.fixture}: not found (nor in {os.path.normpath(FIXTURES)})")
    for seed, errors in enumerate(noisy_steps(path, a.seeds)):
        label = "no noise" if seed == 0 else f"noise seed {seed}"
        print(json.dumps({"run": label, "step_loss_errors": [float(f"{e:.3g}") for e in errors]}), flush=True)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
