"""bench/throughput.py in CI size: one JSON line with the figures the README's performance table needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_prints_one_json_line():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--depth=2", "--aspect-ratio=32", "--head-dim=32",
           "--seq-len=32", "--vocab-size=128", "--device-batch-size=1", "--grad-accum=2", "--fsdp=2", "--steps=2",
           "--warmup=1"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens_per_step"] == 2 * 2 * 32 and result["mesh"] == {"data": 1, "fsdp": 2}
    assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0 and len(result["step_times_s"]) == 2
    assert result["mfu"] == 0.0  # CPU: no peak FLOPs, as in the reference
    assert result["compile_s"] > 0 and result["predicted_peak_bytes"] > 0 and result["loss"] > 0
