"""One declaration per parameter: the model, the sharding, the nanochat converter, the optimizer groups and the counts
all follow jaxchat.model.params.PARAMS, for both recipes, and a new declaration reaches every one of them."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat.interop import convert
from jaxchat.model import mesh as meshlib
from jaxchat.model import params as paramslib
from jaxchat.model.gpt import GPT, GPTConfig, estimate_flops, num_scaling_params
from jaxchat.training import optim, recipe
from jaxchat.training.config import optimizer_flags

# 5 layers (value embeddings on 0, 2, 4), grouped-query attention, a vocabulary that needs padding
CONFIG = GPTConfig(sequence_len=32, vocab_size=100, n_layer=5, n_head=4, n_kv_head=2, n_embd=64)


def flat(tree) -> dict:
    """Leaves by slash-joined path."""
    return {"/".join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def model_params(config, seed=0, **options):
    """The model's parameters as numpy arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(GPT(config, rngs=nnx.Rngs(seed), **options), nnx.Param)))


def check_covered_everywhere(config):
    """Every leaf of config's model is declared, and every consumer of the declarations covers it exactly once."""
    r = recipe.get(config.recipe)
    declared = paramslib.declared(config)
    params = model_params(config, embed_dtype=jnp.bfloat16)
    leaves = flat(params)
    # the model is built from the declarations: same leaves, shapes, dtypes
    assert list(leaves) == sorted(p.path for p in declared)  # (the tree flattens sorted)
    for p in declared:
        assert leaves[p.path].shape == p.shape_for(config), p.path
        assert leaves[p.path].dtype == (jnp.bfloat16 if p.embedding else np.float32), p.path
    # sharding: every leaf's spec has its rank; FSDP splits the declared "embed" axis
    specs = flat(jax.tree.map(lambda s: s.spec, meshlib.param_shardings(params, meshlib.make_mesh(fsdp=2)),
                              is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding)))
    for p in declared:
        spec = tuple(specs[p.path])
        assert len(spec) == len(p.axes) == len(p.shape_for(config)), p.path
        assert all((s == "fsdp") == (a == "embed") for s, a in zip(spec, p.axes)), (p.path, spec)
    # optimizer: each leaf in Muon or one of the recipe's AdamW groups, and every group of the recipe used
    labels = flat(optim.param_labels(params, r.adamw_groups))
    assert {p.path: p.optimizer for p in declared} == labels
    assert set(labels.values()) == {g.name for g in r.adamw_groups} | {"muon"}
    # nanochat: names unique, every element once, an exact round trip
    state = convert.to_reference(jax.tree.map(lambda x: np.asarray(x, np.float32), params), config)
    assert list(state) == convert.to_reference_names(config) and len(set(state)) == len(state)
    assert sum(v.size for v in state.values()) == sum(v.size for v in leaves.values())
    back = flat(convert.from_reference(state, config))
    assert back.keys() == leaves.keys()
    for k in leaves:
        np.testing.assert_array_equal(back[k], leaves[k].astype(np.float32), err_msg=k)
    # nanochat's optimizer groups hold every state-dict name exactly once
    layout = convert.Layout.of(config)
    groups = layout.groups
    assert sorted(n for g in groups for n in g.names) == sorted(state)
    assert layout.shapes == {k: v.shape for k, v in state.items()}  # shapes from the declarations alone
    # counts: every element in one of nanochat's groups
    counts = num_scaling_params(config)
    assert counts["total"] == sum(v.size for v in leaves.values())
    return params, state, groups


@pytest.mark.parametrize("recipe_name", ["348fbb3", "92d63d4"])
def test_every_leaf_of_each_recipe_is_declared_and_covered_everywhere(recipe_name):
    config = dataclasses.replace(CONFIG, recipe=recipe_name)
    params, state, groups = check_covered_everywhere(config)
    has_smear = recipe_name == "92d63d4"
    assert ("smear_gate" in params) == ("backout_lambda" in params) == has_smear
    assert state["transformer.h.4.attn.ve_gate.weight"].shape == (2, config.constants.ve_gate_channels)
    muon = [g for g in groups if g.kind == "muon"]
    # nanochat's Muon order within a layer: attn (c_q, c_k, c_v, c_proj, ve_gate) before mlp
    square = next(list(g.names) for g in muon if g.names[0] == "transformer.h.0.attn.c_q.weight")
    assert square[:2] == ["transformer.h.0.attn.c_q.weight", "transformer.h.0.attn.c_proj.weight"]


@pytest.mark.slow
def test_a_new_block_matrix_is_one_declaration(monkeypatch):
    """Adding a block matrix to PARAMS alone gives the model the parameter, its sharding, its nanochat name per layer,
    its Muon group, and its share of the parameter and FLOP counts (the forward pass is where it would be used)."""
    before = (num_scaling_params(CONFIG)["transformer_matrices"], estimate_flops(CONFIG))
    # an attention matrix of c_fc's shape, declared after mlp_proj: nanochat registers it before the MLP's
    extra = paramslib.Param("blocks/c_gate", ("L", "n", "4n"), ("stack", "embed", "mlp"),
                            paramslib.uniform(lambda c: -0.1, lambda c: 0.1),
                            "transformer.h.{i}.attn.c_gate.weight", "linear", "muon")
    monkeypatch.setattr(paramslib, "PARAMS", paramslib.PARAMS + (extra,))
    params, state, groups = check_covered_everywhere(CONFIG)
    L, n = CONFIG.n_layer, CONFIG.n_embd
    assert params["blocks"]["c_gate"].shape == (L, n, 4 * n) and np.ptp(params["blocks"]["c_gate"]) > 0.1
    assert [state[f"transformer.h.{i}.attn.c_gate.weight"].shape for i in range(L)] == [(4 * n, n)] * L
    tall = next(list(g.names) for g in groups if "transformer.h.0.attn.c_gate.weight" in g.names)
    assert tall[:3] == ["transformer.h.0.attn.c_gate.weight", "transformer.h.0.mlp.c_fc.weight",
                        "transformer.h.1.attn.c_gate.weight"]
    assert num_scaling_params(CONFIG)["transformer_matrices"] == before[0] + L * 4 * n * n
    assert estimate_flops(CONFIG) == before[1] + 6 * L * 4 * n * n
    model = GPT(CONFIG, rngs=nnx.Rngs(0))
    assert model(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, CONFIG.vocab_size)
    opt = optim.make_optimizer(**optimizer_flags(), model_dim=n, **recipe.get(CONFIG.recipe).optimizer_options())
    assert "c_gate" in str(jax.tree_util.tree_structure(opt.init(params)))


def test_an_undeclared_leaf_is_an_error():
    params = model_params(CONFIG)
    params["blocks"]["c_new"] = params["blocks"]["c_q"]
    with pytest.raises(ValueError, match=r"no optimizer group for parameter blocks/c_new \(not in jaxchat.model.params"):
        optim.param_labels(params, recipe.get(CONFIG.recipe).adamw_groups)
    with pytest.raises(ValueError, match=r"not declared in jaxchat.model.params.PARAMS\): \['blocks/c_new'\]"):
        meshlib.param_shardings(params, meshlib.make_mesh(fsdp=2))


def test_initial_values_follow_the_declarations():
    """Each recipe's initialisation (nanochat GPT.init_weights) as declared: zeros, ramps, constants, bounds."""
    for name in ("348fbb3", "92d63d4"):
        config = dataclasses.replace(CONFIG, recipe=name)
        c = config.constants
        params = model_params(config)
        bound = math.sqrt(3 / config.n_embd)
        assert not params["blocks"]["c_proj"].any() and not params["blocks"]["mlp_proj"].any()
        assert np.abs(params["blocks"]["c_q"]).max() <= bound
        assert np.abs(params["blocks"]["c_fc"]).max() <= c.c_fc_scale * bound
        np.testing.assert_allclose(params["resid_lambdas"][[0, -1]], [c.resid_init[0], c.resid_init[0] - c.resid_init[1]])
        assert (params["blocks"]["ve_gate"].max() > 0) == (c.ve_gate_init > 0)
        if c.smear_channels:
            assert float(params["backout_lambda"]) == pytest.approx(c.backout_lambda_init)
            assert params["smear_gate"].shape == (c.smear_channels, 1)
    a, b = model_params(CONFIG, seed=0), model_params(CONFIG, seed=1)
    assert not np.array_equal(a["wte"], b["wte"])
