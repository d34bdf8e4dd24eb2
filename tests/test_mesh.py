"""Sharding declared once: parameter and optimizer-state layouts on (data, fsdp) meshes of 8 host devices."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import GPT, GPTConfig, abstract_model
from jaxchat.runtime.common import UserError
from jaxchat.training import recipe
from jaxchat.training.config import optimizer_flags

CONFIG = GPTConfig(sequence_len=32, vocab_size=120, n_layer=8, n_head=2, n_kv_head=2, n_embd=64)


def abstract_params():
    return nnx.to_pure_dict(nnx.state(abstract_model(CONFIG), nnx.Param))


def specs(shardings):
    return jax.tree.map(lambda s: s.spec, shardings)


def test_data_parallel_replicates_parameters_and_shards_optimizer_state():
    mesh = meshlib.make_mesh(fsdp=1)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
    params = abstract_params()
    assert all(s == P(*(None,) * len(s)) for s in jax.tree.leaves(specs(meshlib.param_shardings(params, mesh))))
    opt = specs(meshlib.optimizer_shardings(params, mesh))
    assert opt["blocks"]["c_q"] == P("data", None, None)  # whole matrices per device: Muon stays local
    assert opt["wte"] == P("data", None)
    assert opt["resid_lambdas"] == P(None)


def test_fsdp_shards_the_model_dimension():
    mesh = meshlib.make_mesh(fsdp=4)
    params = abstract_params()
    p = specs(meshlib.param_shardings(params, mesh))
    assert p["blocks"]["c_fc"] == P(None, "fsdp", None) and p["wte"] == P(None, "fsdp")
    opt = specs(meshlib.optimizer_shardings(params, mesh))
    assert opt["blocks"]["c_fc"] == P(("data", "fsdp"), None, None)
    assert opt["blocks"]["ve_gate"] == P("data", None, None)  # 4 VE layers: only the data axis divides


@pytest.mark.parametrize("recipe", ["348fbb3", "92d63d4"])
def test_every_parameter_of_each_recipe_has_logical_axes(recipe):
    """Each recipe's every leaf has declared logical axes (its sharding is decided, not replicated by default); a leaf
    nobody declared is an error naming it."""
    import dataclasses
    params = nnx.to_pure_dict(nnx.state(abstract_model(dataclasses.replace(CONFIG, recipe=recipe)), nnx.Param))
    mesh = meshlib.make_mesh(fsdp=2)
    assert jax.tree.structure(meshlib.param_shardings(params, mesh)) == jax.tree.structure(params)
    with pytest.raises(ValueError, match=r"without logical axes \(not declared in jaxchat.model.params.PARAMS\): \['new_gate'\]"):
        meshlib.param_shardings(params | {"new_gate": params["resid_lambdas"]}, mesh)


def test_bad_fsdp_size():
    with pytest.raises(UserError, match=r"use one of \[1, 2, 4, 8\]"):
        meshlib.make_mesh(fsdp=3)


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def compiled_update(mesh, param_shardings, recipe_name: str = "348fbb3") -> str:
    """Optimized HLO of MuonAdamW's update on the optimizer-state layout of `mesh` (as in the ZeRO-2 train step)."""
    import jax.numpy as jnp

    from jaxchat.model.mesh import abstract_like
    from jaxchat.training import optim, recipe

    params = abstract_params()
    tx = optim.make_optimizer(**optimizer_flags(), model_dim=CONFIG.n_embd, weight_decay=0.2, muon_dtype=jnp.bfloat16,
                              **recipe.get(recipe_name).optimizer_options())
    opt = jax.eval_shape(tx.init, params)
    opt_sh, grad_sh = meshlib.optimizer_shardings(opt, mesh), meshlib.optimizer_shardings(params, mesh)
    args = (abstract_like(params, grad_sh), abstract_like(opt, opt_sh), abstract_like(params, param_shardings))
    update = jax.jit(lambda g, s, p: tx.update(g, s, p), out_shardings=(grad_sh, opt_sh))
    return update.lower(*args).compile().as_text()


@pytest.mark.slow
def test_muon_orthogonalises_each_matrix_on_one_device():
    """With gradients, parameters and state split by stack entry (ZeRO-2), the whole update (5 Polar Express
    iterations per matrix, NorMuon, AdamW) runs without one collective; with the parameters split along the model
    dimension (FSDP layout) instead, the same update needs collectives, so the check can fail."""
    mesh = meshlib.make_mesh(fsdp=1)
    local = compiled_update(mesh, meshlib.optimizer_shardings(abstract_params(), mesh))
    assert not [c for c in COLLECTIVES if c in local]
    fsdp_mesh = meshlib.make_mesh(fsdp=8)
    split = compiled_update(fsdp_mesh, meshlib.param_shardings(abstract_params(), fsdp_mesh))
    assert any(c in split for c in COLLECTIVES)  # the check can fail


def test_92d63d4_optimizer_needs_no_collective_either():
    """MuonEq and Muon+ reduce over each whole matrix, AdamW's weight decay is elementwise: still device-local."""
    mesh = meshlib.make_mesh(fsdp=1)
    local = compiled_update(mesh, meshlib.optimizer_shardings(abstract_params(), mesh), "92d63d4")
    assert not [c for c in COLLECTIVES if c in local]


@pytest.mark.slow
def test_muon_splits_stacks_that_do_not_divide_the_devices():
    """6 layers on 8 devices: without padding every device orthogonalises all 6 matrices of each stack; padded to 8
    and split, each does one, with the same updates (the FLOPs saved: bench/muon_split.py, tests/test_bench.py)."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from jaxchat.training import optim

    config = dataclasses.replace(CONFIG, n_layer=6)
    model = GPT(config, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
    mesh = meshlib.make_mesh(fsdp=1)
    assert meshlib.optimizer_shardings(params, mesh)["blocks"]["c_q"].spec == P(None, None, None)  # 6 % 8: whole

    def compiled(stack_sharding):
        tx = optim.make_optimizer(**optimizer_flags(), **recipe.get("348fbb3").optimizer_options(), model_dim=config.n_embd, weight_decay=0.2, muon_dtype=jnp.float32,
                                  muon_stack_sharding=stack_sharding)
        state = tx.init(params)
        sh = meshlib.optimizer_shardings(params, mesh)
        update = jax.jit(lambda g, s, p: tx.update(g, s, p)[0], in_shardings=(sh, meshlib.optimizer_shardings(
            state, mesh), meshlib.param_shardings(params, mesh)))
        args = (grads, state, params)
        return update.lower(*args).compile(), args

    (repeated, args), (split, _) = compiled(None), compiled(meshlib.muon_stack_sharding(mesh))
    for ours, want in zip(jax.tree.leaves(split(*args)), jax.tree.leaves(repeated(*args))):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=1e-4, atol=1e-7)  # float32 matmul order


def test_gradient_reduction_scatters_onto_the_optimizer_layout_once():
    """Each mesh axis a parameter is not split over is summed once: a reduce-scatter onto the dimension the
    optimizer's layout splits over it (where it divides), else an all-reduce; FSDP's own axis is left alone (the
    per-layer gathers' transposes already summed it)."""
    data_parallel, fsdp = meshlib.make_mesh(fsdp=1), meshlib.make_mesh(fsdp=4)  # 8 x 1, 2 x 4
    # a Muon stack: replicated, the optimizer splits the stack over every device
    assert meshlib.gradient_reduction((24, 64, 256), P(), P("data"), data_parallel) == ((("data", 0),), P("data", None, None))
    # a scalar, and a stack of 12 that 8 devices do not divide: all-reduced
    assert meshlib.gradient_reduction((), P(), P(), data_parallel) == ((("data", None),), P())
    assert meshlib.gradient_reduction((12, 64), P(), P("data"), data_parallel) == ((("data", None),), P(None, None))
    # FSDP: the width split over fsdp stays; data is scattered over the stack, the optimizer's first axis
    steps, spec = meshlib.gradient_reduction((24, 64, 256), P(None, "fsdp"), P(("data", "fsdp")), fsdp)
    assert steps == (("data", 0),) and spec == P("data", "fsdp", None)
    # a leaf FSDP does not split (a scalar per layer): summed over both axes, scattered where the layout allows
    steps, spec = meshlib.gradient_reduction((24,), P(), P(("data", "fsdp")), fsdp)
    assert steps == (("data", 0), ("fsdp", 0)) and spec == P(("data", "fsdp"))
