"""nanochat state dict <-> jaxchat parameters: exact round trip, shape checks, .pt files when torch is installed."""

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from conftest import shared_fixture
from jaxchat.interop.convert import (config_from_dict, from_reference, load_params, read_reference_npz, to_reference,
                                     to_reference_names)
from jaxchat.model.gpt import GPT, GPTConfig
from jaxchat.runtime.common import UserError


def test_round_trip_is_exact():
    config, state, _ = read_reference_npz(shared_fixture("nanochat_parity_d2.npz"))
    back = to_reference(from_reference(state, config), config)
    assert sorted(back) == sorted(state) == sorted(to_reference_names(config))
    for name in state:
        assert back[name].shape == state[name].shape, name
        np.testing.assert_array_equal(back[name], state[name])


def test_model_round_trip_through_jaxchat_parameters():
    config = GPTConfig(sequence_len=16, vocab_size=70, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="L")
    model = GPT(config, rngs=nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = to_reference(params, config)
    assert state["transformer.h.0.attn.c_k.weight"].shape == (32, 64)  # (out, in): GQA with one kv head
    assert state["transformer.h.2.attn.ve_gate.weight"].shape == (1, 32)
    assert "value_embeds.1.weight" not in state and "value_embeds.0.weight" in state  # odd depth: even layers
    other = GPT(config, rngs=nnx.Rngs(4))
    load_params(other, from_reference(state, config))
    for a, b in zip(*(nnx.to_flat_state(nnx.state(m, nnx.Param)) for m in (model, other))):
        np.testing.assert_array_equal(a[1][...], b[1][...])


def test_mismatched_state_dict_is_a_user_error():
    config, state, _ = read_reference_npz(shared_fixture("nanochat_parity_d2.npz"))
    del state["lm_head.weight"]
    with pytest.raises(UserError, match="missing"):
        from_reference(state, config)


def test_pt_file_when_torch_is_installed(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: .pt import is optional")
    import json

    from jaxchat.interop.nanochat_ckpt import read_checkpoint
    config, state, _ = read_reference_npz(shared_fixture("nanochat_parity_d2.npz"))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "model_000010.pt")
    model_config = {k: getattr(config, k) for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head",
                                                    "n_embd", "window_pattern")}
    (tmp_path / "meta_000010.json").write_text(json.dumps({"model_config": model_config}))
    config2, state2, _ = read_checkpoint(str(tmp_path / "model_000010.pt"))
    assert config2 == config
    for k in state:
        np.testing.assert_array_equal(state2[k], state[k])


def test_recipe_92d63d4_round_trip_is_exact():
    """nanochat 92d63d4: smear_gate.weight (1, 24), smear_lambda (1,), backout_lambda (1,), ve_gate (Hkv, 12)."""
    config, state, _ = read_reference_npz(shared_fixture("nanochat_head_d4.npz"))
    assert config.recipe == "92d63d4"
    params = from_reference(state, config)
    assert params["smear_gate"].shape == (24, 1) and params["smear_lambda"].shape == ()
    assert params["backout_lambda"].shape == () and params["blocks"]["ve_gate"].shape == (2, 12, 2)
    np.testing.assert_array_equal(params["smear_gate"][:, 0], state["smear_gate.weight"][0])
    assert float(params["backout_lambda"]) == float(state["backout_lambda"][0])
    back = to_reference(params, config)
    assert sorted(back) == sorted(state) == sorted(to_reference_names(config))
    for name in state:
        assert back[name].shape == state[name].shape, name
        np.testing.assert_array_equal(back[name], state[name])


def test_recipe_92d63d4_model_round_trip_and_recipe_of_a_config_dict():
    config = GPTConfig(sequence_len=16, vocab_size=70, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="L",
                       recipe="92d63d4")
    model = GPT(config, rngs=nnx.Rngs(3))
    state = to_reference(nnx.to_pure_dict(nnx.state(model, nnx.Param)), config)
    assert state["smear_gate.weight"].shape == (1, 24) and state["backout_lambda"].shape == (1,)
    assert state["transformer.h.2.attn.ve_gate.weight"].shape == (1, 12)
    other = GPT(config, rngs=nnx.Rngs(4))
    load_params(other, from_reference(state, config))
    for a, b in zip(*(nnx.to_flat_state(nnx.state(m, nnx.Param)) for m in (model, other))):
        np.testing.assert_array_equal(a[1][...], b[1][...])
    old = GPTConfig(sequence_len=16, vocab_size=70, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="L")
    with pytest.raises(UserError, match="missing"):  # a 348fbb3 model cannot take a 92d63d4 state dict
        from_reference(state, old)
    saved = dataclasses.asdict(config)
    assert config_from_dict(saved) == config
    del saved["recipe"]  # saved before recipes existed
    assert config_from_dict(saved) == old
    with pytest.raises(UserError, match="recipe 'a825e63' is not one of 348fbb3, 92d63d4"):
        config_from_dict(saved, recipe="a825e63")


def test_recipe_92d63d4_pt_file_is_recognised_by_its_smear_gate(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: .pt import is optional")
    from jaxchat.interop.nanochat_ckpt import read_checkpoint
    config, state, _ = read_reference_npz(shared_fixture("nanochat_head_d4.npz"))
    torch.save({f"_orig_mod.{k}": torch.from_numpy(v) for k, v in state.items()}, tmp_path / "model_000001.pt")
    model_config = {k: getattr(config, k) for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head",
                                                    "n_embd", "window_pattern")}
    (tmp_path / "meta_000001.json").write_text(json.dumps({"model_config": model_config}))
    assert read_checkpoint(str(tmp_path / "model_000001.pt"))[0] == config
