"""bench/vs_nanochat.py: jaxchat against a nanochat checkout at a tiny shape (needs torch and $NANOCHAT_DIR)."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = str(ROOT / "bench" / "vs_nanochat.py")


def nanochat_dir() -> str | None:
    """$NANOCHAT_DIR, else a `nanochat` checkout next to this repository."""
    for d in (os.environ.get("NANOCHAT_DIR"), str(ROOT.parent / "nanochat")):
        if d and os.path.isfile(os.path.join(d, "nanochat", "gpt.py")):
            return d
    return None


@pytest.mark.slow
def test_bench_runs_both_sides_and_prints_the_ratio():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (only bench/vs_nanochat.py needs it): pip install torch")
    if nanochat_dir() is None:
        pytest.skip("no nanochat checkout: set NANOCHAT_DIR to a clone of github.com/karpathy/nanochat (e.g. 348fbb3)")
    cmd = [sys.executable, BENCH, f"--nanochat-dir={nanochat_dir()}", "--depth=2", "--width=64", "--head-dim=32",
           "--seq-len=32", "--batch=2", "--vocab=256", "--window-pattern=SL", "--steps=2", "--warmup=1",
           "--torch-eager"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", JAXCHAT_MALLOC="1")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["depth"], result["n_embd"], result["n_head"], result["batch"]) == (2, 64, 2, 2)
    for side in ("nanochat", "jaxchat"):
        r = result[side]
        assert r["step_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["optimizer_ms"] > 0 and r["compute_dtype"] == "float32"
    assert result["ratio"] == pytest.approx(result["nanochat"]["step_ms"] / result["jaxchat"]["step_ms"], abs=1e-3)
    assert result["cpu_ratio"] == pytest.approx(result["nanochat"]["step_cpu_ms"] / result["jaxchat"]["step_cpu_ms"],
                                                abs=1e-3)
    assert result["backend"] == "cpu" and result["machine"]
    # jaxchat's worker has jaxchat.train's malloc setting, nanochat's only with --nanochat-malloc
    assert result["jaxchat"]["keep_freed_memory"] is True and result["nanochat"]["keep_freed_memory"] is False


def test_a_directory_without_nanochat_is_one_line_and_exit_2():
    with tempfile.TemporaryDirectory() as empty:
        proc = subprocess.run([sys.executable, BENCH, f"--nanochat-dir={empty}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: --nanochat-dir={empty}: no nanochat/gpt.py there; clone "
                                                "nanochat and pass its root"]
