"""Sizing, counting, horizon and batch arithmetic against the reference tables (nanochat/gpt.py GPT.num_scaling_params, GPT.estimate_flops), and the README."""

import re
from pathlib import Path

import pytest

from jaxchat.model.gpt import estimate_flops, num_scaling_params
from jaxchat.runtime.common import UserError
from jaxchat.training.config import config_for_depth
from jaxchat.training.plan import device_batch_warning, grad_accum_steps, make_plan, num_iterations, readme_tables

# nanochat/gpt.py at 348fbb3: its GPT built on PyTorch's meta device, parameter counts per group, num_scaling_params()
# and estimate_flops().
TABLE_2_3 = {  # depth: n, H, #VE, wte, value_embeds, lm_head, transformer_matrices, scalars, total, scaling, flops/token
    4: (256, 2, 2, 8388608, 16777216, 8388608, 3145856, 8, 36700296, 11534464, 84935424),
    12: (768, 6, 6, 25165824, 150994944, 25165824, 84935808, 24, 286262424, 110101632, 802167552),
    20: (1280, 10, 10, 41943040, 419430400, 41943040, 393219200, 40, 896535720, 435162240, 3004189440),
    24: (1536, 12, 12, 50331648, 603979776, 50331648, 679481856, 48, 1384124976, 729813504, 4945112064),
    26: (1664, 13, 13, 54525952, 708837376, 54525952, 863900960, 52, 1681790292, 918426912, 6185320128),
}
ITERATIONS = {4: (181, 231, 264), 12: (1732, 2205, 2520), 20: (6847, 8715, 9960), 24: (11484, 14616, 16704),
              26: (14452, 18393, 21021)}


@pytest.mark.parametrize("depth", sorted(TABLE_2_3))
def test_parameter_groups_and_flops_match_reference(depth):
    n, H, n_ve, *counts, flops = TABLE_2_3[depth]
    config = config_for_depth(depth)
    assert (config.n_embd, config.n_head, config.n_kv_head, len(config.ve_layers)) == (n, H, H, n_ve)
    got = num_scaling_params(config)
    names = ("wte", "value_embeds", "lm_head", "transformer_matrices", "scalars", "total", "scaling")
    assert tuple(got[k] for k in names) == tuple(counts)
    assert estimate_flops(config) == flops
    for ratio, steps in zip((8.25, 10.5, 12), ITERATIONS[depth]):
        assert make_plan(depth=depth, target_param_data_ratio=ratio).num_iterations == steps


def test_published_runs():
    run1 = make_plan(depth=24, target_param_data_ratio=12, device_batch_size=16, data_parallel_size=8)
    assert run1.num_iterations == 16704 and run1.grad_accum_steps == 2
    assert run1.total_flops == pytest.approx(4.330784131228946e19, rel=1e-12)
    assert make_plan(depth=26, target_param_data_ratio=8.5).num_iterations == 14889
    assert make_plan(depth=26, target_param_data_ratio=8.25, total_batch_size=1048576).num_iterations == 7226


def test_odd_depth_is_nudged_to_a_multiple_of_head_dim():
    assert config_for_depth(25).n_embd == 1664 and config_for_depth(25).n_head == 13


def test_horizon_precedence():
    kw = dict(flops_per_token=1000, scaling_params=10_000, total_batch_size=100)
    assert num_iterations(num_iterations=7, target_flops=1e9, target_param_data_ratio=10, **kw) == (7, "--num-iterations")
    assert num_iterations(num_iterations=-1, target_flops=2.5e6, target_param_data_ratio=10, **kw)[0] == 25
    assert num_iterations(num_iterations=-1, target_flops=-1, target_param_data_ratio=10, **kw)[0] == 1000
    with pytest.raises(UserError, match="no training horizon"):
        num_iterations(num_iterations=-1, target_flops=-1, target_param_data_ratio=-1, **kw)


def test_grad_accum_and_batch_errors():
    assert grad_accum_steps(524288, 32, 2048, 8) == 1
    assert grad_accum_steps(524288, 16, 2048, 8) == 2
    assert grad_accum_steps(524288, 32, 2048, 1) == 8
    with pytest.raises(UserError, match=r"use --device-batch-size in \[1, 2, 4, 8, 16, 32\]"):
        grad_accum_steps(524288, 24, 2048, 8)
    with pytest.raises(UserError, match="multiple of"):
        grad_accum_steps(1000, 1, 2048, 8)
    assert "power of 2" in device_batch_warning(24)
    assert device_batch_warning(16) is None


def test_readme_tables_match_the_code():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, table in readme_tables().items():
        match = re.search(rf"<!-- table:{name} -->\n(.*?)\n\n", readme + "\n\n", re.S)
        assert match, f"README lacks the {name} table"
        assert match.group(1).strip() == table, f"README {name} table differs from `python -m jaxchat.plan --readme`"
