"""Run jaxchat on a reference fixture and write what it computes, in the fixture's names and layouts.

    python -m jaxchat.parity FIXTURE.npz --out OUT.npz

Reads `config/*`, `param/*`, `idx`, `targets` (nanochat/gpt.py GPT's parameter names and PyTorch layouts at
348fbb3; tests/fixtures/README.md) and writes `loss`, `logits` and `grad/<name>` computed by jaxchat in float32 on
the current backend. If the fixture has `opt/json`, it also runs its optimizer steps (batches
`step{k}_idx`/`step{k}_targets`, fresh state, from `param/*`) and writes `step{k}_loss` and `step{k}/<name>`
(parameters after step k). An fp8 unit fixture (`x`, `w`, `go`) gets jaxchat's fp8 matmul
instead: `q_x`, `q_w`, `q_go`, `inv_*`, `y`, `grad_x`, `grad_w` (jaxchat.model.fp8.unit_fixture_outputs).
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxchat.interop.convert import model_from_reference, read_reference_npz, to_reference
from jaxchat.model import fp8
from jaxchat.model.gpt import GPT
from jaxchat.runtime import cli
from jaxchat.runtime.common import UserError, check_output, cli_parser, read_input, user_path
from jaxchat.training import optim, recipe as recipes


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


def optimizer_from_settings(settings: dict, model_dim: int,
                            recipe: str = recipes.DEFAULT) -> tuple[optax.GradientTransformation, dict]:
    """MuonAdamW of `recipe` and the schedule values for a fixture's `opt/json`, checked against its param groups."""
    r = recipes.get(recipe)
    groups = settings["groups"]
    kwargs = dict(model_dim=model_dim, embedding_lr=settings["embedding_lr"], unembedding_lr=settings["unembedding_lr"],
                  matrix_lr=settings["matrix_lr"], scalar_lr=settings["scalar_lr"], adam_betas=tuple(groups[0]["betas"]))
    ours = optim.group_hyperparams(**kwargs, adamw_groups=r.adamw_groups, muon_variant=r.muon)
    lrm = float(settings["lr_multiplier"])
    fields = optim.param_group_fields(ours, r.adamw_groups, lrm, settings["muon_momentum"], settings["weight_decay"])
    # The reference's group order: the AdamW groups, then one Muon group per distinct shape (same settings).
    expected = [fields[g.name] for g in r.adamw_groups]
    expected += [fields["muon"]] * (len(groups) - len(expected))
    for i, (g, e) in enumerate(zip(groups, expected)):
        same = (g["kind"] == e["kind"] and np.isclose(g["lr"], e["lr"], rtol=1e-9, atol=0)
                and np.isclose(g["weight_decay"], e["weight_decay"])
                and (g["kind"] != "adamw" or np.allclose(g["betas"], e["betas"]))
                and (g["kind"] != "muon" or np.isclose(g["beta2"], e["beta2"]) and g["ns_steps"] == e["ns_steps"]
                     and np.isclose(g["momentum"], e["momentum"])))
        if not same:
            raise UserError(f"opt/json group {i} {g} does not match jaxchat's recipe {r.name} group fields {e}")
    tx = optim.make_optimizer(**kwargs, weight_decay=settings["weight_decay"],
                              muon_dtype=jnp.dtype(settings["muon_dtype"]), **r.optimizer_options())
    values = {"lrm": lrm, "momentum": settings["muon_momentum"], "wd": settings["weight_decay"]}
    return tx, values


def run_optimizer_steps(model: GPT, settings: dict, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """From the model's weights with fresh optimizer state, one step per batch: [{loss, params after}] per step."""
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    tx, values = optimizer_from_settings(settings, model.config.n_embd, model.config.recipe)

    @jax.jit
    def step(params, opt_state, idx, targets, values):
        loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(idx, targets))(params)
        opt_state = optim.set_schedule(opt_state, values)
        updates, opt_state = tx.update(grads, opt_state, params)
        return loss, optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    values = {k: np.float32(v) for k, v in values.items()}
    results = []
    for idx, targets in batches:
        loss, params, opt_state = step(params, opt_state, jnp.asarray(idx, jnp.int32),
                                       jnp.asarray(targets, jnp.int32), values)
        results.append({"loss": loss, "params": jax.tree.map(np.asarray, params)})
    return results


def compute_forward(fixture_path: str) -> tuple[dict[str, np.ndarray], GPT, "np.lib.npyio.NpzFile"]:
    """(loss, logits and grad/<name> keyed as in the fixture, the model holding the fixture's weights, the fixture)."""
    config, state, data = read_reference_npz(fixture_path)
    model = model_from_reference(config, state)
    loss, logits, grads = loss_and_grads(model, data["idx"], data["targets"])
    out = {"loss": np.asarray(loss, np.float64), "logits": np.asarray(logits)}
    out.update({f"grad/{k}": v for k, v in to_reference(jax.tree.map(np.asarray, grads), config).items()})
    return out, model, data


def compute(fixture_path: str) -> dict[str, np.ndarray]:
    """Everything jaxchat computes for a fixture, keyed as in the fixture."""
    with read_input(fixture_path, np.load, "fixture", "pass a reference fixture .npz") as data:
        if {"x", "w", "go"} <= set(data.files):
            return fp8.unit_fixture_outputs(data["x"], data["w"], data["go"])
    out, model, data = compute_forward(fixture_path)
    config = model.config
    if "opt/json" in data.files:
        settings = json.loads(str(data["opt/json"]))
        n_steps = sum(1 for k in data.files if k.startswith("step") and k.endswith("_idx"))
        batches = [(data[f"step{k}_idx"], data[f"step{k}_targets"]) for k in range(1, n_steps + 1)]
        for k, result in enumerate(run_optimizer_steps(model, settings, batches), start=1):
            out[f"step{k}_loss"] = np.asarray(result["loss"], np.float64)
            out.update({f"step{k}/{name}": v for name, v in to_reference(result["params"], config).items()})
    return out


def main(argv=None) -> None:
    parser = cli_parser(__doc__)
    parser.add_argument("fixture", type=user_path, help="reference fixture .npz (config/*, param/*, idx, targets, ...)")
    parser.add_argument("--out", required=True, type=user_path, help="where to write jaxchat's results (.npz)")
    args = parser.parse_args(argv)
    args.out = check_output(args.out, "--out")  # before the work
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity, no TF32/bf16 passes
    out = compute(args.fixture)
    np.savez(args.out, **out)
    print(f"wrote {len(out)} arrays to {args.out}" + (f" (loss {float(out['loss']):.6f})" if "loss" in out else ""))


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
