"""Three MuonAdamW steps against the reference's (fixture keys `opt/json`, `step{k}_*`; shared/fixtures/README.md).

moved(p) = ‖p_jax − p_ref‖ / ‖p_ref − p_start‖ per parameter after step k. In float32-Muon fixtures a handful of
elements per matrix sit on a discontinuity of the reference algorithm and follow float32 noise in the gradients
either way: the cautious-WD mask (O·P ≥ 0) where the orthogonalised update O is ~0 (e.g. a dead MLP unit's row), and
Adam's first steps where |g| is near eps = 1e-10. Each such element is off by a whole lr·wd·P or lr-sized step, which
alone can exceed 1e-3 of a small parameter's update; so the 1e-3 bound excludes the 5 worst elements of each
parameter with ≥ 1000 elements, and the whole-tensor error gets a separate, looser bound.
"""

import functools
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import LOCAL_FIXTURES, moved, shared_fixture

pytestmark = pytest.mark.slow

FP32_FIXTURES = ["shared:nanochat_parity_d2_fp32muon.npz", "ref_d3_v300_LSS_fp32muon.npz",
                 "ref_d10_v260_SSSL_fp32muon.npz"]
BF16_FIXTURES = ["shared:nanochat_parity_d2.npz", "ref_d3_v300_LSS.npz", "ref_d10_v260_SSSL.npz"]


def fixture_path(name: str):
    if name.startswith("shared:"):
        return shared_fixture(name.removeprefix("shared:"))
    path = LOCAL_FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {path} not found")
    return path


@functools.lru_cache(maxsize=None)
def run(path) -> tuple[dict, dict]:
    """(reference arrays, jaxchat's step{k}_loss and step{k}/<name>) for a fixture, computed once per session.

    The optimizer part of `parity.compute` only (its forward/backward part is tested in test_model.py).
    """
    from jaxchat import parity
    from jaxchat.interop.convert import model_from_reference, read_reference_npz, to_reference
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity, as `python -m jaxchat.parity`
    config, state, data = read_reference_npz(str(path))
    batches = [(data[f"step{k}_idx"], data[f"step{k}_targets"]) for k in (1, 2, 3)]
    results = parity.run_optimizer_steps(model_from_reference(config, state),
                                         json.loads(str(data["opt/json"])), batches)
    out = {}
    for k, result in enumerate(results, start=1):
        out[f"step{k}_loss"] = np.asarray(result["loss"])
        out.update({f"step{k}/{n}": v for n, v in to_reference(result["params"], config).items()})
    return {k: data[k] for k in data.files}, out


def step_report(name: str) -> list[tuple[int, float, float, float, str]]:
    """Per step and parameter: (k, loss error, moved, moved without the few discontinuity elements, name)."""
    ref, out = run(fixture_path(name))
    settings = json.loads(str(ref["opt/json"]))
    assert settings["lr_multiplier"] == 1.0
    names = [k.removeprefix("param/") for k in ref if k.startswith("param/")]
    rows = []
    for k in (1, 2, 3):
        loss_err = abs(float(out[f"step{k}_loss"]) - float(ref[f"step{k}_loss"]))
        for n in names:
            ours, want, start = out[f"step{k}/{n}"], ref[f"step{k}/{n}"], ref[f"param/{n}"]
            assert ours.shape == want.shape, (k, n)
            exclude = 5 if want.size >= 1000 else 0
            rows.append((k, loss_err, moved(ours, want, start), moved(ours, want, start, exclude), n))
    return rows


@pytest.mark.parametrize("name", FP32_FIXTURES)
def test_float32_muon_steps_match_reference(name):
    assert json.loads(str(np.load(fixture_path(name))["opt/json"]))["muon_dtype"] == "float32"
    rows = step_report(name)
    for k, loss_err, full, robust, n in rows:
        assert loss_err <= 1e-4, (k, loss_err)
        assert robust <= 1e-3, (k, n, robust)
        assert full <= 1e-2, (k, n, full)
    # Most parameters agree to float32 noise, discontinuities or not.
    assert np.median([full for _, _, full, _, _ in rows]) < 1e-4


@pytest.mark.parametrize("name", BF16_FIXTURES)
def test_bfloat16_muon_steps_match_reference(name):
    assert json.loads(str(np.load(fixture_path(name))["opt/json"]))["muon_dtype"] == "bfloat16"
    for k, loss_err, full, _, n in step_report(name):
        assert loss_err <= 2e-3, (k, loss_err)
        assert full <= 0.25, (k, n, full)


FIXTURES_92D63D4 = {"nanochat_head_d4.npz": "float32", "nanochat_head_d4_bf16muon.npz": "bfloat16"}
MOVED_92D63D4 = {"float32": 0.05, "bfloat16": 0.25}  # bf16 Polar Express: noise between correct implementations
# Free-running step losses. bf16 Polar Express: as test_bfloat16_muon_steps_match_reference. Measured on the bf16
# fixture with the model as it was when its bound was 1e-4 (bench/parity_noise.py): the step-3 loss error is 8.7e-5,
# and 6.8e-5 to 2.5e-4 once every gradient is multiplied by (1 + 2^-24 noise), half a float32 rounding step. Each
# step from the reference's parameters (the next test) stays within 1e-4.
FREE_LOSS_92D63D4 = {"float32": 1e-4, "bfloat16": 2e-3}


@pytest.mark.parametrize("name", sorted(FIXTURES_92D63D4))
def test_92d63d4_steps_match_reference(name):
    """nanochat 92d63d4's six AdamW groups and MuonEq/Muon+ Muon: the fixture's three MuonAdamW steps in a row.

    Every parameter within 5% (float32 Polar Express, recipe 92d63d4 on CPU) or 25% (bfloat16, as on GPU) of the reference's
    update in norm, and the step losses within 1e-4 (bfloat16: 2e-3, see FREE_LOSS_92D63D4). Elementwise: see the next
    test."""
    ref, out = run(shared_fixture(name))
    settings = json.loads(str(ref["opt/json"]))
    assert str(ref["config/rev"]) == "92d63d4" and settings["muon_dtype"] == FIXTURES_92D63D4[name]
    assert settings["groups"][5]["param_names"] == ["smear_gate.weight", "smear_lambda", "backout_lambda"]
    names = [k.removeprefix("param/") for k in ref if k.startswith("param/")]
    for k in (1, 2, 3):
        loss_err = abs(float(out[f"step{k}_loss"]) - float(ref[f"step{k}_loss"]))
        assert loss_err <= FREE_LOSS_92D63D4[FIXTURES_92D63D4[name]], (k, loss_err)
        for n in names:
            assert moved(out[f"step{k}/{n}"], ref[f"step{k}/{n}"], ref[f"param/{n}"]) <= MOVED_92D63D4[
                FIXTURES_92D63D4[name]], (k, n)


def steps_from_reference_parameters(path) -> tuple[dict, list[dict]]:
    """Each of the fixture's steps from the reference's parameters before it (optimizer state carried from ours).

    In three free steps, the few elements on a discontinuity of step 1 (Adam where |g| ~ eps, the cautious mask
    where O ~ 0; see the module docstring) change step 2's gradients, which moves small tensors such as a 2x12
    ve_gate by ~1e-3 of their update; restarting each step from the reference's parameters tests each update alone."""
    from jaxchat import parity
    from jaxchat.interop.convert import model_from_reference, read_reference_npz, to_reference
    from jaxchat.training import optim
    jax.config.update("jax_default_matmul_precision", "highest")
    config, _, data = read_reference_npz(str(path))
    tx, values = parity.optimizer_from_settings(json.loads(str(data["opt/json"])), config.n_embd, config.recipe)

    def params_at(prefix):
        model = model_from_reference(config, {k.removeprefix(prefix): data[k] for k in data.files
                                              if k.startswith(prefix)})
        return nnx.split(model, nnx.Param)

    graphdef, params = params_at("param/")
    opt_state = tx.init(nnx.to_pure_dict(params))

    @jax.jit
    def step(params, opt_state, idx, targets):
        loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(idx, targets))(params)
        updates, opt_state = tx.update(grads, optim.set_schedule(opt_state, values), params)
        return optax.apply_updates(params, updates), opt_state, loss

    results = []
    for k in (1, 2, 3):
        start = nnx.to_pure_dict(params_at("param/" if k == 1 else f"step{k - 1}/")[1])
        params, opt_state, loss = step(start, opt_state, data[f"step{k}_idx"].astype(np.int32),
                                       data[f"step{k}_targets"].astype(np.int32))
        results.append({"loss": float(loss), "params": to_reference(jax.tree.map(np.asarray, params), config)})
    return {k: data[k] for k in data.files}, results


@pytest.mark.parametrize("name", sorted(FIXTURES_92D63D4))
def test_92d63d4_each_step_matches_reference(name):
    """Every parameter within 5% (25% bf16) of the reference's update of that step in norm; float32: >= 99.9% of
    the elements of every parameter within 1e-3 of that update's rms; losses within 1e-4."""
    ref, results = steps_from_reference_parameters(shared_fixture(name))
    for k, result in enumerate(results, start=1):
        assert abs(result["loss"] - float(ref[f"step{k}_loss"])) <= 1e-4, k
        for n, ours in result["params"].items():
            want, start = ref[f"step{k}/{n}"], ref[("param/" if k == 1 else f"step{k - 1}/") + n]
            assert moved(ours, want, start) <= MOVED_92D63D4[FIXTURES_92D63D4[name]], (k, n)
            if FIXTURES_92D63D4[name] == "float32":
                rms = np.sqrt(np.mean((want.astype(np.float64) - start) ** 2))
                assert np.mean(np.abs(ours - want) <= 1e-3 * rms) >= 0.999, (k, n)
