"""The 92d63d4 recipe's schedules and batch / weight-decay transfer against nanochat 92d63d4's own values (fixture
`schedule/json` of nanochat_head_d4.npz, shared/fixtures/README.md), and the recipe tables."""

import functools
import json

import numpy as np
import pytest

from conftest import shared_fixture
from jaxchat.runtime.common import UserError
from jaxchat.training import config, optim, recipe
from jaxchat.training.plan import make_plan, transfer

R92D63D4 = recipe.get("92d63d4")
RATIOS = (8, 10.5, 12)


@functools.lru_cache(maxsize=None)
def reference_tables() -> dict:
    return json.loads(str(np.load(shared_fixture("nanochat_head_d4.npz"))["schedule/json"]))


def scaling(row: dict) -> int:
    """scripts/base_train.py get_scaling_params: transformer matrices + lm_head."""
    return row["counts"]["transformer_matrices"] + row["counts"]["lm_head"]


def test_schedules_equal_nanochat_92d63d4():
    d = R92D63D4.defaults
    tables = reference_tables()["schedules"]
    assert {int(n) for n in tables} == {7, 120, 1680, 5568}
    checked = 0
    for n, table in tables.items():
        for it, want in table.items():
            got = optim.schedule_values(int(it), num_iterations=int(n), warmup_ratio=0.0,
                                        warmdown_ratio=d["warmdown_ratio"], final_lr_frac=d["final_lr_frac"],
                                        weight_decay=0.059738, warmup_steps=d["warmup_steps"], schedules=R92D63D4.schedules)
            np.testing.assert_allclose([got["lrm"], got["momentum"], got["wd"]], want, rtol=0, atol=1e-12,
                                       err_msg=f"N={n} it={it}")
            checked += 1
    assert checked == 44


@pytest.mark.parametrize("depth", [4, 8, 12, 16, 20, 24, 26, 32])
def test_auto_batch_steps_lr_scale_and_weight_decay_equal_nanochat_92d63d4(depth):
    """The transfer rules from the reference's own parameter counts (the model's counts: test_model.py)."""
    rows = reference_tables()["depths"]
    for ratio in RATIOS:
        want = rows[str(depth)][f"ratio_{ratio}"]
        tokens = int(ratio * scaling(rows[str(depth)]))
        t = transfer(R92D63D4, depth=depth, total_batch_size=-1, weight_decay=R92D63D4.defaults["weight_decay"],
                     tokens=tokens, ref_tokens=ratio * scaling(rows["12"]))
        assert (tokens, t.total_batch_size, tokens // t.total_batch_size) == (
            want["tokens"], want["total_batch"], want["num_iterations"]), (depth, ratio)
        assert t.auto_batch and t.batch_lr_scale == want["batch_lr_scale"]
        assert t.weight_decay_scaled == want["weight_decay_scaled"]


@pytest.mark.parametrize("depth", [4, 12, 24, 32])
def test_plan_of_the_92d63d4_model_equals_nanochat(depth):
    """make_plan end to end: the 92d63d4 model's counts, then the transfer (the record run: d24 ratio 8)."""
    want = reference_tables()["depths"][str(depth)]
    for ratio in RATIOS:
        plan = make_plan(depth=depth, target_param_data_ratio=ratio, total_batch_size=-1, recipe="92d63d4",
                         weight_decay=0.28, device_batch_size=1)
        assert plan.params["scaling"] == scaling(want)
        assert (plan.total_batch_size, plan.num_iterations) == (want[f"ratio_{ratio}"]["total_batch"],
                                                                want[f"ratio_{ratio}"]["num_iterations"])
        assert plan.transfer.weight_decay_scaled == want[f"ratio_{ratio}"]["weight_decay_scaled"]
    if depth == 24:
        record = make_plan(depth=24, target_param_data_ratio=8, total_batch_size=-1, recipe="92d63d4",
                           weight_decay=0.28, device_batch_size=16, data_parallel_size=8)
        assert (record.total_batch_size, record.num_iterations, record.grad_accum_steps) == (1048576, 5568, 4)
        assert "Auto-computed optimal batch size: 1,048,576 tokens" in record.summary()


def test_explicit_batch_wins_and_auto_needs_the_recipe():
    plan = make_plan(depth=12, target_param_data_ratio=8, total_batch_size=2**20, recipe="92d63d4", weight_decay=0.28)
    assert plan.total_batch_size == 2**20 and not plan.transfer.auto_batch
    assert plan.transfer.batch_lr_scale == pytest.approx(2**0.5)
    assert plan.transfer.weight_decay_scaled == pytest.approx(0.28 * 2**0.5)  # d12 is the reference horizon
    with pytest.raises(UserError, match="not part of recipe 348fbb3"):
        make_plan(depth=12, total_batch_size=-1)
    with pytest.raises(UserError, match="must not be 0"):
        make_plan(depth=12, target_param_data_ratio=0, num_iterations_flag=10, total_batch_size=-1, recipe="92d63d4")
    # 348fbb3 unchanged: (12/d)² weight decay, batch as given
    ref = make_plan(depth=24).transfer
    assert (ref.total_batch_size, ref.batch_lr_scale, ref.weight_decay_scaled) == (524288, 1.0, 0.05)


def test_recipe_tables():
    assert recipe.get("348fbb3").adamw_groups == recipe.ADAMW_GROUPS_348FBB3
    assert [g.name for g in recipe.get("348fbb3").adamw_groups] == ["lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas"]  # reference order
    assert set(R92D63D4.defaults) <= set(config.defaults())  # the defaults a recipe changes are flags that exist
    assert R92D63D4.defaults["eval_tokens"] == 80 * 524288 and R92D63D4.defaults["unembedding_lr"] == 0.008
    with pytest.raises(UserError, match="choose one of 348fbb3, 92d63d4"):
        recipe.get("a825e63")


def test_92d63d4_groups_and_learning_rates():
    """GPT.setup_optimizer at 92d63d4, d24 at the record batch (bls √2): the spec's effective LRs."""
    groups = optim.group_hyperparams(**config.optimizer_flags(dict(config.DEFAULTS, unembedding_lr=0.008)), model_dim=1536,
                                     batch_lr_scale=2**0.5,
                                     adamw_groups=R92D63D4.adamw_groups, muon_variant=R92D63D4.muon)
    lrs = {name: g["lr"] for name, g in groups.items()}
    assert lrs == pytest.approx({"lm_head": 0.008, "wte": 0.3, "value_embeds": 0.15, "resid_lambdas": 0.0070711,
                                 "x0_lambdas": 0.70711, "smear": 0.2, "muon": 0.028284}, rel=2e-5)
    assert groups["muon"]["beta2"] == 0.9
    assert {g.name: (g.betas, g.weight_decay) for g in R92D63D4.adamw_groups} == {
        "lm_head": ((0.8, 0.96), 0.01), "wte": ((0.8, 0.995), 0.001), "value_embeds": ((0.8, 0.995), 0.01),
        "resid_lambdas": ((0.8, 0.95), 0.05), "x0_lambdas": ((0.96, 0.95), 0.0), "smear": ((0.8, 0.95), 0.0)}
    params = {"wte": 0, "lm_head": 0, "value_embeds": 0, "resid_lambdas": 0, "x0_lambdas": 0, "blocks": {"c_q": 0},
              "smear_gate": {"kernel": 0}, "smear_lambda": 0, "backout_lambda": 0}
    labels = optim.param_labels(params, R92D63D4.adamw_groups)
    assert labels["smear_gate"] == {"kernel": "smear"} and labels["backout_lambda"] == "smear"
    assert labels["blocks"] == {"c_q": "muon"}
    with pytest.raises(ValueError, match="no optimizer group"):
        optim.param_labels(params, recipe.ADAMW_GROUPS_348FBB3)  # 348fbb3 has no smear group


def test_recipe_flag_defaults_and_precedence():
    from jaxchat.training.config import parse_flags
    flags = parse_flags(["--recipe=92d63d4"])
    assert {k: flags[k] for k in R92D63D4.defaults} == dict(R92D63D4.defaults)
    assert parse_flags([]).total_batch_size == 524288 and parse_flags([]).recipe == "348fbb3"
    # explicit flags, --config.* and the config file all win over the recipe's defaults
    assert parse_flags(["--recipe", "92d63d4", "--weight-decay=0.1", "--total-batch-size=524288"]).weight_decay == 0.1
    assert parse_flags(["--recipe=92d63d4", "--config.data=demo"]).data == "demo"
    speedrun = parse_flags(["--config=configs/speedrun.py"])
    assert (speedrun.recipe, speedrun.depth, speedrun.target_param_data_ratio, speedrun.device_batch_size,
            speedrun.total_batch_size, speedrun.unembedding_lr, speedrun.fp8) == ("92d63d4", 24, 8.0, 16, -1, 0.008, True)
    assert parse_flags(["--config=configs/speedrun.py", "--recipe=348fbb3"]).total_batch_size == 524288
    for argv, message in ((["--total-batch-size=-1"], "part of recipe 92d63d4"),
                          (["--recipe=92d63d4", "--adam-beta1=0.9"], "do not exist in recipe 92d63d4"),
                          (["--recipe=run6"], "choose one of 348fbb3, 92d63d4")):
        with pytest.raises(UserError, match=message):
            parse_flags(argv)


class SavedStep:
    """A checkpoint directory with one step saved with `model_config` (what train.resume_point reads)."""

    directory = "/nowhere/d4"

    def __init__(self, model_config):
        self.model_config = model_config

    def steps(self):
        return [5]

    def resolve_step(self, resume):
        return 5

    def read_meta(self, step):
        return {"model_config": self.model_config, "inputs": {}, "dataloader_state_dict": {}}


def test_resuming_with_another_recipe_is_one_line():
    import dataclasses

    from jaxchat.train import resume_point
    from jaxchat.training.config import config_for_depth
    from jaxchat.training.config import parse_flags
    c = parse_flags(["--recipe=92d63d4", "--depth=4", "--resume-from-step=5"])
    saved = dataclasses.asdict(config_for_depth(4))
    del saved["recipe"]  # a checkpoint from before recipes: 348fbb3's
    with pytest.raises(UserError, match=r"trained with --recipe=348fbb3: resume it with --recipe=348fbb3 \(not 92d63d4\)"):
        resume_point(c, SavedStep(saved), dataclasses.asdict(config_for_depth(4, recipe="92d63d4")), {},
                     tok=None)  # the step records no tokenizer: none to check
