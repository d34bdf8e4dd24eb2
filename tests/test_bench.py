"""bench/throughput.py, bench/compile.py and bench/muon_split.py in CI size."""

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
