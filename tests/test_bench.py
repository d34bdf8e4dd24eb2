"""bench/throughput.py, bench/compile.py, bench/muon_split.py and bench/gpu_check.sh in CI size."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_prints_a_json_line_and_the_readme_row():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--depth=2", "--aspect-ratio=32", "--head-dim=32",
           "--seq-len=32", "--vocab-size=128", "--device-batch-size=1", "--grad-accum=2", "--fsdp=2", "--steps=2",
           "--warmup=1"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-2])
    assert result["tokens_per_step"] == 2 * 2 * 32 and result["mesh"] == {"data": 1, "fsdp": 2}
    assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0 and len(result["step_times_s"]) == 2
    assert result["mfu"] == 0.0  # CPU: no peak FLOPs, as in the reference
    assert result["compile_s"] > 0 and result["predicted_peak_bytes"] > 0 and result["loss"] > 0
    row = out.strip().splitlines()[-1].split(" | ")
    assert row[0] == "| cpu" and row[3:5] == ["2", "1"] and row[6] == "0.0%"  # the README table's columns


def test_layer_scan_keeps_the_compiled_step_flat_in_depth():
    """bench/compile.py in CI size: the scanned step has the same HLO size at depth 6 and 8 (same unrolled
    remainder for pattern "L"); unrolled layers grow it by every layer."""
    cmd = [sys.executable, str(ROOT / "bench" / "compile.py"), "--depths=6,8", "--aspect-ratio=0", "--width=64",
           "--head-dim=32", "--seq-len=32", "--vocab-size=128", "--window-pattern=L", "--device-batch-size=1",
           "--compute-dtype=float32", "--muon-dtype=float32"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {(r["depth"], r["layers"]): r for r in map(json.loads, out.splitlines()[:4])}
    scan6, scan8 = rows[6, "scan"]["hlo_ops"], rows[8, "scan"]["hlo_ops"]
    unrolled6, unrolled8 = rows[6, "unrolled"]["hlo_ops"], rows[8, "unrolled"]["hlo_ops"]
    assert abs(scan8 - scan6) <= 0.01 * scan6, (scan6, scan8)
    assert unrolled8 - unrolled6 >= 2 * 500, (unrolled6, unrolled8)  # 2 more layers, hundreds of ops each
    assert scan8 < unrolled8
    assert "| 8 | 64 |" in out  # the markdown table


def test_split_muon_stacks_cut_the_optimizer_flops_per_device():
    """6 layers on 8 host devices: padded to 8 and split, each device orthogonalises 1 matrix per stack, not 6."""
    cmd = [sys.executable, str(ROOT / "bench" / "muon_split.py"), "--devices=8", "--depths=6", "--aspect-ratio=16",
           "--head-dim=32"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["n_embd"] == 96
    assert result["flops_whole"] > 4 * result["flops_split"], result


def _gpu_check(args: list[str], nanochat_dir: str) -> tuple[dict, str]:
    """`bash bench/gpu_check.sh ARGS` with this interpreter: (its JSON line, its whole stdout)."""
    env = dict(os.environ, PYTHON=sys.executable, NANOCHAT_DIR=nanochat_dir, XLA_FLAGS="")
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900, check=True).stdout
    return json.loads(out.strip().splitlines()[-1]), out


def test_gpu_check_dry_run_measures_every_case_cold_and_warm(tmp_path):
    """The GPU check's own path on CPU at d2, T 64: both cases measured, compiled cold then loaded from the persistent
    cache, XLA's H100 prediction beside them; nanochat without a checkout is one line, not a failure."""
    result, out = _gpu_check(["--dry-run"], str(tmp_path))  # an empty directory: no nanochat there
    assert result["dry_run"] is True and result["backend"] == "cpu" and result["jax"]
    assert set(result["jaxchat"]) == {"d2-bf16", "d2-fp8"}
    for key, r in result["jaxchat"].items():
        assert "error" not in r, (key, r)
        assert (r["depth"], r["fp8"], r["device_batch"], r["seq_len"]) == (2, key.endswith("fp8"), 2, 64)
        assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 64 / (r["step_ms"] / 1000), rel=0.01)
        assert r["mfu"] == 0.0 and r["peak_gib_measured"] is None  # CPU: no peak FLOPs, no device memory stats
        assert r["peak_gib_predicted"] > 0 and r["peak_gib_predicted_here"] > 0  # jaxchat.aot's H100 and this CPU's
        assert r["compile_s_cold"] > 0 and r["compile_s_warm"] > 0
        assert r["cache_cold"]["cache_misses"] >= 1 and r["cache_warm"] == {"cache_hits": 1, "cache_misses": 0}
        assert r["loss"] > 0 and "projection" in r
    assert result["nanochat"] == {"d2": {"skipped": result["nanochat"]["d2"]["skipped"]}}
    assert "nanochat: skipped (no nanochat checkout at" in out and result["ratio_tokens_per_s"] == {}
    assert "| d2-bf16 | 2 |" in out and "| d2-fp8 | 2 |" in out  # the table


def test_gpu_check_dry_run_times_nanochat_beside_jaxchat():
    """With torch and a nanochat checkout ($NANOCHAT_DIR or ../nanochat, as tests/test_vs_nanochat.py finds it):
    nanochat's step at the same shape, and the ratio."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    found = [d for d in (os.environ.get("NANOCHAT_DIR"), str(ROOT.parent / "nanochat"))
             if d and os.path.isfile(os.path.join(d, "nanochat", "gpt.py"))]
    if not found:
        pytest.skip("no nanochat checkout: set NANOCHAT_DIR (bash bench/prepare_gpu_check.sh makes one)")
    result, _ = _gpu_check(["--dry-run", "--no-fp8"], found[0])
    n = result["nanochat"]["d2"]
    assert (n["depth"], n["device_batch"], n["seq_len"], n["compute_dtype"]) == (2, 2, 64, "float32")
    assert n["step_ms"] > 0 and n["tokens_per_s"] > 0 and n["first_step_s"] > 0 and n["attention"] == "sdpa"
    assert result["ratio_tokens_per_s"]["d2-bf16"] == pytest.approx(
        result["jaxchat"]["d2-bf16"]["tokens_per_s"] / n["tokens_per_s"], rel=1e-3)


def test_gpu_check_docs_state_its_defaults():
    """docs/performance.md's GPU check section quotes gpu_check.py's defaults: steps, warm-up, budget, device batch."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    a = gpu_check.parse([])
    docs = (ROOT / "docs" / "performance.md").read_text().split("## GPU check", 1)[1].split("\n## ", 1)[0]
    assert (a.depths, a.seq_len, a.steps, a.warmup, a.budget_s) == ([24, 12], 2048, 10, 3, 430.0)
    assert f"median of {a.steps} steps after {a.warmup} warm-up steps" in docs and "--budget-s=430" in docs
    assert gpu_check.DEVICE_BATCH == {12: 32, 24: 16} and "d24 at 16" in docs and "d12 at 32" in docs
