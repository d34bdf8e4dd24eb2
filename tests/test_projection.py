"""jaxchat.training.projection's roofline model on a hand-written XLA:GPU program, against the arithmetic done by hand:
a cuBLAS GEMM and an elementwise fusion inside a while loop of 3 trips, overlapping an async all-reduce."""

import dataclasses

import pytest

from jaxchat.runtime.targets import GPU_TARGETS, Efficiency
from jaxchat.training import projection

STATE = "(s32[], bf16[4096,4096], bf16[4096,4096], f32[16777216])"
HLO = f"""HloModule m, is_scheduled=true

%fused_add (p0: bf16[4096,4096], p1: bf16[4096,4096]) -> bf16[4096,4096] {{
  %p0 = bf16[4096,4096]{{1,0}} parameter(0)
  %p1 = bf16[4096,4096]{{1,0}} parameter(1)
  ROOT %add = bf16[4096,4096]{{1,0}} add(%p0, %p1)
}}

%sum (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}}

%body (p: {STATE}) -> {STATE} {{
  %p = {STATE} parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[4096,4096]{{1,0}} get-tuple-element(%p), index=1
  %w = bf16[4096,4096]{{1,0}} get-tuple-element(%p), index=2
  %g = f32[16777216]{{0}} get-tuple-element(%p), index=3
  %ars = f32[16777216]{{0}} all-reduce-start(%g), channel_id=1, replica_groups={{{{0,1,2,3,4,5,6,7}}}}, to_apply=%sum
  %gemm = (bf16[4096,4096]{{1,0}}, s8[4194304]{{0}}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", \
backend_config={{"gemm_backend_config":{{"dot_dimension_numbers":{{"lhs_contracting_dimensions":["1"],\
"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}}}}
  %y = bf16[4096,4096]{{1,0}} get-tuple-element(%gemm), index=0
  %e = bf16[4096,4096]{{1,0}} fusion(%y, %x), kind=kLoop, calls=%fused_add
  %ard = f32[16777216]{{0}} all-reduce-done(%ars)
  ROOT %t = {STATE} tuple(%i, %e, %w, %ard)
}}

%cond (p: {STATE}) -> pred[] {{
  %p = {STATE} parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}}

ENTRY %main (init: {STATE}) -> {STATE} {{
  %init = {STATE} parameter(0)
  ROOT %loop = {STATE} while(%init), condition=%cond, body=%body, backend_config={{"known_trip_count":{{"n":"3"}}}}
}}
"""


def test_gemm_fusion_and_overlapped_all_reduce_in_a_loop_match_the_hand_arithmetic():
    gpu = dataclasses.replace(GPU_TARGETS["h100"], bandwidth=int(1e12), interconnect=100e9)  # round numbers
    eff = Efficiency(gemm_bf16=0.5, gemm_fp8=0.5, attention_fwd=0.5, attention_bwd=0.5, hbm=0.5, interconnect=0.5,
                     launch_s=1e-6)
    p = projection.project(HLO, gpu, devices=8, tokens_per_step=8 * 4096, flops_per_token=1e9, steps=100, eff=eff)
    matrix = 4096 * 4096 * 2  # bytes of one bf16 4096 x 4096
    # the GEMM: 2 * 4096^3 FLOPs at 989e12 * 0.5, slower than its 3 matrices at 1e12 * 0.5 bytes/s
    gemm_s = max(2 * 4096**3 / (989e12 * 0.5), 3 * matrix / 0.5e12)
    assert gemm_s == pytest.approx(2.77933e-4, rel=1e-5)
    fusion_s = 3 * matrix / 0.5e12  # add: two matrices read, one written
    # the all-reduce of 64 MiB of f32 in a ring of 8: 2 * 7/8 of it on each link, at 100e9 * 0.5 bytes/s
    all_reduce_s = 2 * 7 / 8 * 16777216 * 4 / 50e9
    between = gemm_s + fusion_s + 2 * 1e-6  # compute scheduled between its start and its done, launch gaps included
    exposed = all_reduce_s - between
    assert exposed == pytest.approx(1.8676e-3, rel=1e-4)
    assert p.step_s == pytest.approx(3 * (between + exposed))  # 3 trips (known_trip_count)
    assert p.breakdown_s == pytest.approx(dict(gemm=3 * gemm_s, attention=0.0, memory=3 * fusion_s, launch=6e-6,
                                               collective_exposed=3 * exposed))
    assert sum(p.breakdown_s.values()) == pytest.approx(p.step_s)
    assert p.collective_busy_s == pytest.approx(3 * all_reduce_s) and p.kernels == 6
    assert p.flops == 3 * 2 * 4096**3 and p.bytes == 3 * 6 * matrix
    # 4096 tokens per device per step; MFU = 1e9 FLOPs/token * tokens/s / 989e12; 100 steps to the horizon
    assert p.tokens_per_s_per_device == pytest.approx(4096 / p.step_s) and p.tokens_per_s_per_node == pytest.approx(
        8 * 4096 / p.step_s)
    assert p.mfu == pytest.approx(1e9 * 4096 / p.step_s / 989e12) and p.horizon_s == pytest.approx(100 * p.step_s)


def test_an_all_reduce_hidden_by_enough_compute_is_not_exposed():
    """The same program with NVLink 10x faster: the all-reduce (0.23 ms) fits in the GEMM and fusion (0.48 ms)."""
    gpu = dataclasses.replace(GPU_TARGETS["h100"], bandwidth=int(1e12), interconnect=1000e9)
    eff = Efficiency(gemm_bf16=0.5, hbm=0.5, interconnect=0.5, launch_s=1e-6)
    p = projection.project(HLO, gpu, devices=8, tokens_per_step=8 * 4096, flops_per_token=1e9, steps=1, eff=eff)
    assert p.breakdown_s["collective_exposed"] == 0.0 and p.collective_busy_s > 0
    assert p.step_s == pytest.approx(3 * (2 * 4096**3 / (989e12 * 0.5) + 3 * 4096 * 4096 * 2 / 0.5e12 + 2e-6))


def test_sliced_parameters_count_their_slices_and_in_place_updates_their_update():
    """A fusion reading one row of a stacked buffer (through a bitcast and a multiply) reads that row, not the stack;
    a dynamic-update-slice at a fusion's root writes the update in place."""
    hlo = """HloModule m, is_scheduled=true

%fused_row (p0: f32[24,1024], p1: s32[]) -> f32[1,1024] {
  %p0 = f32[24,1024]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %b = f32[24,1024]{1,0} bitcast(%p0)
  %m = f32[24,1024]{1,0} multiply(%b, %b)
  %z = s32[] constant(0)
  ROOT %row = f32[1,1024]{1,0} dynamic-slice(%m, %p1, %z), dynamic_slice_sizes={1,1024}
}

%fused_put (p0: f32[24,1024], p1: f32[1,1024], p2: s32[]) -> f32[24,1024] {
  %p0 = f32[24,1024]{1,0} parameter(0)
  %p1 = f32[1,1024]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %put = f32[24,1024]{1,0} dynamic-update-slice(%p0, %p1, %p2, %z)
}

ENTRY %main (s: f32[24,1024], i: s32[]) -> f32[24,1024] {
  %s = f32[24,1024]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %r = f32[1,1024]{1,0} fusion(%s, %i), kind=kLoop, calls=%fused_row
  ROOT %u = f32[24,1024]{1,0} fusion(%s, %r, %i), kind=kLoop, calls=%fused_put
}
"""
    p = projection.project(hlo, GPU_TARGETS["h100"], devices=1, tokens_per_step=1, flops_per_token=1, steps=1)
    row = 1024 * 4
    # fused_row: the row read, an s32 index read, the row written; fused_put: the row read and written in place, the
    # s32 index read
    assert p.bytes == (row + 4 + row) + (2 * row + 4) and p.kernels == 2


def test_causal_pairs_with_and_without_a_window():
    assert projection.causal_pairs(4) == 1 + 2 + 3 + 4
    assert projection.causal_pairs(4, window=2) == 1 + 2 + 2 + 2
    assert projection.causal_pairs(2048, window=513) == sum(min(i + 1, 513) for i in range(2048))


def test_reproject_on_an_unknown_gpu_is_one_line():
    """python -m jaxchat.aot --reproject names GPUs of jaxchat.runtime.targets; another is one line (exit code 2 via
    cli.run), before anything compiles."""
    from jaxchat import aot
    from jaxchat.runtime.common import UserError
    with pytest.raises(UserError, match="--reproject=h200,b200: b200 is not one of h100, h200, a100") as error:
        aot.main(["--reproject=h200,b200", "--depth=2"])
    assert "\n" not in str(error.value)


def test_horizon_table_cells_say_na_for_fp8_on_the_a100():
    """bench/horizon.py's cells: hours, step ms and MFU per GPU from the projections; fp8 on the A100 is n/a."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("horizon", Path(__file__).resolve().parents[1] / "bench" / "horizon.py")
    horizon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(horizon)
    p = dict(horizon_s=7200.0, step_s=0.5, mfu=0.4)
    r = dict(projection=p, reprojections=dict(h200=p, a100=p))
    assert horizon.cells(r, fp8=False) == ["2.00 h (500 ms, 40%)"] * 3
    assert horizon.cells(r, fp8=True)[2] == "n/a (no fp8)"
