"""What JAX's persistent compilation cache saves at start-up: `python -m jaxchat.train` started three times on the same
flags (the demo by default) in one run: without the cache (`--compile-cache=off`), cold (an empty cache, filled as it
goes) and warm (the same cache again). Per start: seconds to the first step line and to the end, and the programs JAX
loaded from the cache or compiled (its own DEBUG log). `--repeats=N` does it N times with a fresh cache each (the
cache-off start first, then last) and reports medians. One JSON line, then the README's table rows.

    python bench/compile_cache.py                                   # the demo, 2 steps, its evaluation and samples
    python bench/compile_cache.py --iterations=5 -- --depth=6       # flags after -- go to jaxchat.train

The corpus and tokenizer are built before the timed starts, in a temporary $JAXCHAT_BASE_DIR (or --base-dir).
"""

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIT, MISS = "Persistent compilation cache hit for '", "PERSISTENT COMPILATION CACHE MISS for '"


def start(base: str, cache: str, tag: str, iterations: int, extra: list[str]) -> dict:
    """One start of the training command: seconds to the first step line and in all, programs loaded and compiled."""
    env = dict(os.environ, JAXCHAT_BASE_DIR=base, WANDB_MODE="disabled", JAX_DEBUG_LOG_MODULES="jax._src.compiler")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-u", "-m", "jaxchat.train", "--config=configs/demo.py", f"--num-iterations={iterations}",
           "--log-every=1", "--run=dummy", "--tensorboard=false", f"--model-tag={tag}", f"--compile-cache={cache}",
           *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first_step is None and line.startswith("step 0"):
            first_step = time.perf_counter() - t0
    code = proc.wait()
    total = time.perf_counter() - t0
    if code != 0 or first_step is None:
        sys.exit(f"{tag}: exit code {code}\n{''.join(lines[-40:])}")
    devices = next((line.split(";")[0].strip() for line in lines if line.startswith("Devices: ")), "")
    return {"first_step_s": round(first_step, 2), "total_s": round(total, 2), "devices": devices,
            "loaded": sum(HIT in line for line in lines), "compiled_and_written": sum(MISS in line for line in lines)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=2, help="training steps per start")
    p.add_argument("--repeats", type=int, default=1, help="times to start off, cold and warm (medians reported)")
    p.add_argument("--base-dir", default=None, help="$JAXCHAT_BASE_DIR for the starts (default: a temporary one)")
    p.add_argument("extra", nargs="*", help="flags for jaxchat.train (after --)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_compile_cache.") as tmp:
        base = args.base_dir or tmp
        env = dict(os.environ, JAXCHAT_BASE_DIR=base)
        for module in ("jaxchat.dataset", "jaxchat.tok_train"):  # the demo corpus and tokenizer, not timed
            subprocess.run([sys.executable, "-m", module, "--demo"], cwd=ROOT, env=env, check=True,
                           capture_output=True)
        all_runs = {"off": [], "cold": [], "warm": []}
        for i in range(args.repeats):
            cache = os.path.join(tmp, f"jax_cache_{i}")  # empty for each cold start
            # off first, then last: a start's place in the sequence (file caches, a neighbour's load) evens out
            for name in ("off", "cold", "warm") if i % 2 == 0 else ("cold", "warm", "off"):
                all_runs[name].append(start(base, "off" if name == "off" else cache, f"bench_cc_{name}_{i}",
                                            args.iterations, args.extra))
        entries = [f for f in Path(cache).iterdir() if f.name.endswith("-cache")]
        runs = {name: {key: round(statistics.median(r[key] for r in rs), 2) for key in rs[0] if key != "devices"}
                for name, rs in all_runs.items()}
        result = {"jax": importlib.metadata.version("jax"), "jaxlib": importlib.metadata.version("jaxlib"),
                  "devices": all_runs["warm"][0]["devices"], "iterations": args.iterations, "extra": args.extra,
                  "repeats": args.repeats, **runs, "entries": len(entries),
                  "cache_mb": round(sum(f.stat().st_size for f in entries) / 2**20, 2),
                  "first_step_saved_s": round(runs["off"]["first_step_s"] - runs["warm"]["first_step_s"], 2),
                  "first_step_s_all": {name: [r["first_step_s"] for r in rs] for name, rs in all_runs.items()}}
    print(json.dumps(result))
    for name in ("off", "cold", "warm"):
        r = runs[name]
        print(f"| {name} | {r['first_step_s']:.1f} s | {r['total_s']:.1f} s | {r['loaded']:g} | "
              f"{format(r['compiled_and_written'], 'g') if name != 'off' else '–'} |")


if __name__ == "__main__":
    main()
