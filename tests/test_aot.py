"""The train step compiled for 8 H100s by XLA's own GPU compiler (no GPU: the CUDA plugin compiles on the host):
cuDNN attention in every layer, fp8 GEMMs for every qualifying layer under --fp8, async gradient collectives, no CPU
attention, and a predicted peak within the target's capacity; and for an 8-chip TPU v5e slice by XLA:TPU (libtpu, no
TPU): splash attention in every layer. Also the kernel inventory's counting itself."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from jaxchat import aot
from jaxchat.training import inventory

CUDA_PLUGIN = any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
needs_plugin = pytest.mark.skipif(not CUDA_PLUGIN, reason="the CUDA plugin is not installed: pip install "
                                  "\"jax[cuda12]==<the installed jax version>\" (.ci/run installs it)")
LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed: pip install \"jax[tpu]==<the installed "
                                  "jax version>\" (.ci/run installs it)")
D12 = ["--depth=12", "--max-seq-len=2048", "--device-batch-size=8"]  # a real-width model at T 2048, 4 micro-batches
# d12's width in two layers (a short window and a full one) at T 256, one row per chip: XLA:TPU's compile time grows
# with the width and the rows (40 s here; 107 s at 32 rows per chip)
V5E_SMALL = ["--depth=2", "--aspect-ratio=384", "--max-seq-len=256", "--device-batch-size=auto",
             "--total-batch-size=2048", "--fsdp=2"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """compile_for_target, once per flag set (in a fresh base directory: nanochat's vocabulary, 32768)."""
    cache = {}

    def get(*flags: str, **where) -> dict:
        key = (flags, tuple(sorted(where.items())))
        if key not in cache:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("JAXCHAT_BASE_DIR", str(tmp_path_factory.mktemp("base")))
                cache[key] = aot.compile_for_target(list(flags), **{"target": "h100", "devices": 8, **where})
        return cache[key]
    return get


def test_inventory_weights_loop_bodies_by_trip_count_and_sees_async_collectives():
    """A while body's calls count trip-count times; a collective started async counts as async, a bare one as sync;
    fp8, f32 and bf16 GEMMs are told apart; jaxchat's CPU attention is seen by its name."""
    hlo = """HloModule m

%body (p: (s32[], bf16[8,8])) -> (s32[], bf16[8,8]) {
  %x = bf16[8,8]{1,0} parameter(0)
  %a = bf16[8,8]{1,0} custom-call(%x, %x), custom_call_target="__cublas$lt$matmul"
  %b = bf16[8,8]{1,0} custom-call(%x, %x), custom_call_target="__cublas$lt$matmul$f8"
  %c = bf16[8,8]{1,0} custom-call(%x), custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %t = (s32[], bf16[8,8]) tuple(%i, %a)
}

%cond (p: (s32[], bf16[8,8])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: bf16[8,8]) -> bf16[8,8] {
  %w = (s32[], bf16[8,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %u = f32[8,8]{1,0} parameter(0)
  %d = bf16[8,8]{1,0} custom-call(%g), custom_call_target="__cudnn$fmhaSoftmaxBackward"
  %e = (f32[8,8]{1,0}, s8[64]{0}) custom-call(%u, %u), custom_call_target="__cublas$lt$matmul"
  %s = ((f32[8]{0}), f32[8]{0}) all-reduce-start(%z), replica_groups={}
  %r = f32[8]{0} all-gather(%z), dimensions={0}
  ROOT %m = bf16[8,8]{1,0} multiply(%d, %d), metadata={op_name="jit(step)/blocked_attention/mul"}
}
"""
    counts = inventory.count(hlo)
    assert counts["cublas_gemms"] == 6 + 1 and counts["fp8_gemms"] == 6 and counts["f32_gemms"] == 1
    assert counts["cudnn_attention_fwd"] == 6 and counts["cudnn_attention_bwd"] == 1
    assert counts["async:all-reduce"] == 1 and counts["sync:all-gather"] == 1 and counts["sync_collectives"] == 1
    assert counts["cpu_attention"] == 1 and counts["unknown_trip_counts"] == 0


def test_inventory_reads_xla_tpu_loops_and_splash_kernels():
    """XLA:TPU records no trip counts: a `counter < constant` condition gives it; splash's Pallas kernels are counted
    by their names (forward, dq, dkv); a condition of another form is an unknown trip count."""
    hlo = """HloModule m

%cond (p: (s32[], bf16[8])) -> pred[] {
  %constant.7 = s32[]{:T(128)} constant(12)
  %p = (s32[]{:T(128)}, bf16[8]) parameter(0)
  %gte = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%gte, %constant.7), direction=LT, metadata={op_name="while/cond/lt"}
}

%body (p: (s32[], bf16[8])) -> (s32[], bf16[8]) {
  %splash_mha_fwd_residuals.2 = (f32[256,128], bf16[1,256,128]) custom-call(%a, %b), custom_call_target="tpu_custom_call"
  %splash_mha_dq_no_residuals.1 = bf16[1,256,128] custom-call(%a, %b), custom_call_target="tpu_custom_call"
  %splash_mha_dkv_no_residuals.3 = (bf16[1,256,128], bf16[1,256,128]) custom-call(%a), custom_call_target="tpu_custom_call"
  ROOT %t = (s32[], bf16[8]) tuple(%i, %x)
}

%odd (p: (s32[], bf16[8])) -> pred[] {
  ROOT %ne = pred[] compare(%x, %y), direction=NE
}

ENTRY %main (x: bf16[8]) -> bf16[8] {
  %w = (s32[]{:T(128)}, bf16[8]) while(%init), condition=%cond, body=%body
  %v = (s32[]{:T(128)}, bf16[8]) while(%init), condition=%odd, body=%body
  ROOT %r = bf16[8] get-tuple-element(%w), index=1
}
"""
    counts = inventory.count(hlo)
    assert counts["splash_fwd"] == counts["splash_dq"] == counts["splash_dkv"] == 12 + 1
    assert counts["unknown_trip_counts"] == 1


@pytest.mark.slow
@needs_plugin
def test_h100_bf16_step_has_cudnn_attention_in_every_layer_and_fits(compiled):
    r = compiled(*D12)
    assert r["attention"] == "cudnn" and r["compute_dtype"] == "bfloat16" and r["grad_accum"] == 4  # 2^19 tokens
    assert r["cudnn_attention_per_layer"] == [1.0, 1.0]  # layers x micro-batches forward and backward calls
    assert r["cpu_attention"] == 0 and r["f32_gemms"] == 0 and r["triton_gemms"] == 0 and r["cublas_gemms"] > 0
    assert r["async_collectives"].get("all-reduce", 0) + r["async_collectives"].get("reduce-scatter", 0) > 0
    assert r["sync_collectives"] == {} and r["unknown_trip_counts"] == 0
    assert r["fits"] and r["peak_bytes"] <= 0.9 * r["usable_bytes"] and r["problems"] == []
    # one gradient reduction per step, after the micro-batches: no collective inside the layer or micro-batch loops;
    # layers unrolled: no scanned stack writing the backward's residuals into stacked buffers
    assert r["loop_collectives"] == {} and r["loop_stacked_writes"] == 0


@pytest.mark.slow
@needs_plugin
def test_h100_step_has_a_projection_whose_parts_sum_to_the_step(compiled):
    """The roofline projection of d12 at T 2048 on 8 H100s (jaxchat.training.projection): positive, its parts summing to
    the step, MFU below 1, tokens/s and the horizon's time following from the step, and labelled in the table."""
    r = compiled(*D12)
    p = r["projection"]
    assert p["step_s"] > 0 and p["kernels"] > 0 and p["flops"] > 0 and p["bytes"] > 0
    assert p["breakdown_s"]["gemm"] > 0 and p["breakdown_s"]["attention"] > 0 and p["breakdown_s"]["memory"] > 0
    assert min(p["breakdown_s"].values()) >= 0 and p["collective_busy_s"] > 0
    assert sum(p["breakdown_s"].values()) == pytest.approx(p["step_s"])
    assert 0 < p["mfu"] < 1
    assert p["tokens_per_s_per_device"] == pytest.approx(2**19 / 8 / p["step_s"])  # d12's 2^19 tokens per step
    assert p["tokens_per_s_per_node"] == pytest.approx(8 * p["tokens_per_s_per_device"])
    assert p["horizon_steps"] > 0 and p["horizon_s"] == pytest.approx(p["horizon_steps"] * p["step_s"])
    assert "not a measurement; assumptions in jaxchat/runtime/targets.py" in aot.table(r)


@needs_plugin
def test_h100_fp8_step_has_three_fp8_gemms_per_qualifying_layer(compiled):
    """--fp8: the forward GEMM and both backward GEMMs of q, k, v, c_proj, c_fc, mlp_proj and lm_head in fp8."""
    r = compiled(*D12, "--fp8")
    # no GEMM of a dense layer's size left in bf16; XLA merges q, k and v's forward GEMMs (one fp8 input) and their
    # weight gradients' (one fp8 x) at this width, so there are at most 3 per layer call
    assert r["bf16_qualifying_gemms"] == 0 and 0 < r["fp8_gemms"] <= 3 * (6 * 12 + 1) * r["grad_accum"]
    assert r["cudnn_attention_per_layer"] == [1.0, 1.0] and r["cpu_attention"] == 0 and r["f32_gemms"] == 0
    assert r["fp8_gemms_f32_out"] == 0  # every fp8 GEMM writes bf16 (jaxchat.model.fp8._dot), none a float32 copy
    assert r["loop_collectives"] == {} and r["fits"] and r["problems"] == []


@pytest.mark.slow
@needs_plugin
def test_h100_fsdp_step_gathers_parameters_asynchronously(compiled):
    """--fsdp=8: parameters sharded over all 8 GPUs, gathered for the layers with async all-gathers (T 2048)."""
    flags = ("--depth=4", "--max-seq-len=2048", "--device-batch-size=8")  # FSDP's shape, compiled fast
    r, data_parallel = compiled(*flags, "--fsdp=8"), compiled(*flags)
    assert r["mesh"] == {"data": 1, "fsdp": 8}
    assert r["async_collectives"].get("all-gather", 0) > 0 and r["sync_collectives"] == {}
    assert r["cudnn_attention_per_layer"] == [1.0, 1.0] and r["fits"] and r["problems"] == []
    # inside the loops at most the weights' all-gathers and the gradients' reduce-scatters, and less memory than
    # data parallel at the same device batch
    assert set(r["loop_collectives"]) <= {"all-gather", "reduce-scatter"}
    assert r["peak_bytes"] < data_parallel["peak_bytes"] and data_parallel["loop_collectives"] == {}


@pytest.mark.slow
@needs_plugin
def test_inventory_catches_cpu_attention_in_a_gpu_step(compiled, monkeypatch):
    """The check can fail: a GPU step traced with the CPU attention (the fault jaxchat once had) is reported."""
    from jaxchat.runtime import backend
    real = backend.for_mesh
    monkeypatch.setattr(backend, "for_mesh", lambda *a, **k: dataclasses.replace(real(*a, **k), attention="blocked"))
    r = compiled("--depth=2", "--max-seq-len=256", "--device-batch-size=1", "--total-batch-size=2048")
    assert r["cpu_attention"] > 0 and r["cudnn_attention_per_layer"] == [0.0, 0.0]
    assert "jaxchat's CPU attention" in r["problems"]


@pytest.mark.slow
@needs_plugin
def test_inventory_catches_a_scanned_layer_stack_in_a_gpu_step(compiled, monkeypatch):
    """The check can fail: the same GPU step with its layers scanned (the CPU's choice, and the GPU's before) writes
    the backward's residuals into stacked buffers inside the loop, and is reported."""
    from jaxchat.runtime import backend
    real, real_problems = backend.for_mesh, aot.problems
    monkeypatch.setattr(backend, "for_mesh", lambda *a, **k: dataclasses.replace(real(*a, **k), scan_layers=True))
    monkeypatch.setattr(aot, "problems", lambda counts, run_backend, *a, **k: real_problems(
        counts, dataclasses.replace(run_backend, scan_layers=False), *a, **k))  # judged as the GPU step it replaces
    r = compiled("--depth=10", "--window-pattern=L", "--max-seq-len=256", "--device-batch-size=1",
                 "--total-batch-size=2048")  # layers 0-7 repeat 4 times (period 2)
    assert r["loop_stacked_writes"] > 0 and any("stacked residual writes" in p for p in r["problems"])


@pytest.mark.slow
@pytest.mark.entry
@needs_plugin
def test_command_prints_a_table_and_one_json_line(tmp_path):
    """python -m jaxchat.aot: the table, then one JSON line; exit 0 when the step fits and nothing is wrong."""
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(tmp_path))
    env.pop("JAX_PLATFORMS", None)  # the command sets it itself
    done = subprocess.run([sys.executable, "-m", "jaxchat.aot", "--target=a100", "--devices=2", "--depth=2",
                           "--max-seq-len=256", "--device-batch-size=auto", "--total-batch-size=2048"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device_kind"] == "NVIDIA A100-SXM4-80GB" and result["device_batch_size"] == 4  # auto: 2048/256/2
    assert "cuDNN attention" in done.stdout and result["attention"] == "cudnn"
    assert result["fp8_gemms"] == 0


def test_missing_plugin_is_one_line(monkeypatch):
    """Without the CUDA plugin: one line naming what to install, exit code 2."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    from jaxchat.runtime.common import UserError
    with pytest.raises(UserError, match=r"needs JAX's cuda plugin \(not a device\): pip install -e '\.\[cuda12\]'"):
        aot.topology_devices("h100", 8, 1)


def bench_script(name: str):
    """bench/<name>.py as a module (bench/ is not a package)."""
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A table made with another jax (another XLA) is checked within this fraction of its peak, everything else equal
OTHER_JAX_PEAK = 0.1


@pytest.mark.slow
@needs_plugin
def test_readme_gpu_memory_table_matches_the_compiler(compiled):
    """The H100 memory table of docs/performance.md (bench/memory.py) for d12 at device batch 8, bf16 and fp8, is what
    XLA's GPU compiler predicts for that row's flags now (the other rows come from the same script): each cell exactly
    with the jax the table names; with another jax the same remat choice, fitting, its peak within OTHER_JAX_PEAK."""
    import re
    from pathlib import Path

    import jax
    bench = bench_script("memory")
    readme = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    table = re.search(r"<!-- table:gpu-memory -->\n(.*?)\n\n", readme, re.S).group(1)
    same_jax = f"jax {jax.__version__};" in table
    row = next(line for line in table.splitlines() if line.startswith("| d12 | 8 |"))
    for flags, cell in zip((D12, D12 + ["--fp8"]), row.split(" | ")[2:4]):
        r = compiled(*flags)
        gib, remat = cell.split()[:2]
        assert f"({r['remat']})" == remat and r["fits"], (flags, cell, r["remat"])
        assert abs(r["peak_bytes"] / 2**30 - float(gib)) <= OTHER_JAX_PEAK * float(gib), (flags, cell, r["peak_bytes"])
        if same_jax:
            assert bench.cell(r) == cell, flags


@pytest.mark.slow
@needs_libtpu
def test_v5e_step_has_splash_attention_in_every_layer_and_fits(compiled):
    """8 compile-only v5e chips (XLA:TPU, 15.75 GiB each), V5E_SMALL with FSDP over 2 of the chips (splash's
    shard_map over both mesh axes): splash attention forward and both backward kernels in every layer, bf16, within
    90% of the HBM."""
    r = compiled(*V5E_SMALL, target="v5e")
    assert (r["platform"], r["device_kind"], r["hosts"], r["mesh"]) == ("tpu", "TPU v5 lite", 1, {"data": 4, "fsdp": 2})
    assert r["attention"] == "splash" and r["compute_dtype"] == "bfloat16" and r["device_batch_size"] == 1
    assert r["splash_per_layer"] == [1.0, 1.0, 1.0] and r["cpu_attention"] == 0 and r["unknown_trip_counts"] == 0
    assert r["usable_bytes"] == int(15.75 * 2**30) and r["fits"] and r["peak_bytes"] <= 0.9 * r["usable_bytes"]
    assert r["problems"] == [] and r["async_collectives"].get("all-gather", 0) + r["sync_collectives"].get(
        "all-gather", 0) > 0  # FSDP gathers the parameters
    assert "splash attention: fwd 1, dq 1, dkv 1 per layer and micro-batch" in aot.table(r)


def test_tpu_slice_bad_input_is_one_line(monkeypatch):
    """A slice libtpu would not describe, or v4 (libtpu's compile-only v4 chips are two devices each), or no libtpu:
    one line saying what to use instead."""
    from jaxchat.runtime.common import UserError
    for target, chips, hosts, says in (("v5e", 6, None, "a power-of-two number of chips"),
                                       ("v5p", 2, None, "at least 4"), ("v5e", 8, 4, "use --hosts=1"),
                                       ("v6e", 16, 2, "use --hosts=4"), ("v4", 8, None, "one of v5e, v5p, v6e")):
        with pytest.raises(UserError, match=says) as error:
            aot.topology_devices(target, chips, hosts)
        assert "\n" not in str(error.value)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"needs JAX's tpu plugin \(not a device\): pip install -e '\.\[tpu\]'"):
        aot.topology_devices("v6e", 8)


@pytest.mark.slow
@needs_libtpu
def test_readme_tpu_memory_table_matches_the_compiler(compiled):
    """The README's TPU table (bench/tpu_memory.py): its first row, V5E_SMALL, is what XLA:TPU makes of those flags
    now, every cell but the compile time (the other rows come from the same script, a compile of minutes each); with
    another jax than the table's, the peak within OTHER_JAX_PEAK and still fitting."""
    import re
    from pathlib import Path

    import jax
    bench = bench_script("tpu_memory")
    assert bench.ROWS[0] == ("v5e", 8, tuple(V5E_SMALL))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = re.search(r"<!-- table:tpu-memory -->\n(.*?)\n\n", readme, re.S).group(1)
    same_jax = f"jax {jax.__version__}," in table
    in_readme = next(line for line in table.splitlines() if f"`{' '.join(V5E_SMALL)}`" in line).split(" | ")[:-1]
    now = bench.row(tuple(V5E_SMALL), compiled(*V5E_SMALL, target="v5e")).split(" | ")[:-1]
    peak = 5  # "0.43 of 15.75" ("... over" where it does not fit); every other cell but the compile time is equal
    assert in_readme[:peak] + in_readme[peak + 1:] == now[:peak] + now[peak + 1:]
    (readme_gib, of, usable), (now_gib, *rest) = in_readme[peak].split(), now[peak].split()
    assert rest == [of, usable] and abs(float(now_gib) - float(readme_gib)) <= OTHER_JAX_PEAK * float(readme_gib), now
    if same_jax:
        assert in_readme[peak] == now[peak]


@pytest.mark.slow
@needs_libtpu
def test_tpu_evaluation_runs_splash_in_its_shard_map_without_a_mesh_in_context():
    """Validation bpb's forward (jitted outside the train step, no mesh in context) on 8 v5e chips: splash attention
    still runs per chip in its shard_map (the backend carries the mesh); a Mosaic call left to XLA to partition does
    not compile."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxchat.eval import loss_eval
    from jaxchat.model import mesh as meshlib
    from jaxchat.model.gpt import GPTConfig, abstract_model
    from jaxchat.runtime import backend
    mesh = meshlib.make_mesh(devices=aot.topology_devices("v5e", 8))
    tpu = backend.for_mesh(mesh)
    config = GPTConfig(sequence_len=256, vocab_size=512, n_layer=2, n_head=1, n_kv_head=1, n_embd=128,
                       window_pattern="SL")
    graphdef, state = nnx.split(abstract_model(config, compute_dtype="bfloat16", backend=tpu))
    params = nnx.to_pure_dict(state)
    params = meshlib.abstract_like(params, meshlib.param_shardings(params, mesh))
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=meshlib.row_sharding(mesh))
    token_bytes = jax.ShapeDtypeStruct((512,), jnp.int32, sharding=meshlib.replicated(mesh))
    hlo = loss_eval.make_bpb_step(graphdef).lower(params, tokens, tokens, token_bytes).compile().as_text()
    assert inventory.count(hlo)["splash_fwd"] == 2  # both layers, the short window and the full one
