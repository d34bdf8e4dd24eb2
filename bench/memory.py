"""Predicted peak memory per device of the train step compiled for GPUs by XLA's own GPU compiler (jaxchat.aot: the
CUDA plugin, no GPU), for depths x device batch sizes, bf16 and --fp8, as the Markdown table of docs/performance.md.

    python bench/memory.py                                  # d12 d20 d24 d26 at 8 16 32, bf16 and fp8, 8 x H100
    python bench/memory.py --depths 12 --batches 8          # a subset (each cell is a compile: 20-200 s on 2 cores)

Each cell is `python -m jaxchat.aot --target=T --devices=N --depth=D --device-batch-size=B [--fp8]` (jaxchat.train's
defaults otherwise: T 2048, nanochat's vocabulary and total batch, --remat=auto), run in its own process.
"""

import argparse
import json
import subprocess
import sys


def compile_cell(target: str, devices: int, depth: int, batch: int, fp8: bool) -> dict:
    """jaxchat.aot's JSON line for one cell."""
    argv = [sys.executable, "-m", "jaxchat.aot", f"--target={target}", f"--devices={devices}", f"--depth={depth}",
            f"--device-batch-size={batch}"] + (["--fp8"] if fp8 else [])
    done = subprocess.run(argv, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"{' '.join(argv[1:])} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def cell(r: dict) -> str:
    """Peak GiB, the remat policy --remat=auto chose, and a mark where it is over 90% of the usable memory."""
    return f"{r['peak_bytes'] / 2**30:.1f} ({r['remat']}){'' if r['fits'] else ' over'}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="h100")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 20, 24, 26])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args(argv)
    import jax

    from jaxchat.runtime import xla_flags
    from jaxchat.runtime.targets import GPU_TARGETS
    usable = GPU_TARGETS[args.target].memory_bytes * xla_flags.memory_fraction() / 2**30
    print(f"XLA's predicted peak per device (GiB; --remat=auto's choice), {args.devices} x "
          f"{GPU_TARGETS[args.target].device_kind}, usable {usable:.1f} GiB (90%: {0.9 * usable:.1f}); "
          f"jax {jax.__version__}; 'over': above 90%")
    print("| depth | device batch | bf16 | fp8 | compile s | flags |")
    print("|---|---|---|---|---|---|", flush=True)
    for depth in args.depths:
        for batch in args.batches:
            bf16, fp8 = (compile_cell(args.target, args.devices, depth, batch, f) for f in (False, True))
            print(row(depth, batch, bf16, fp8), flush=True)
            print(json.dumps(dict(depth=depth, batch=batch, bf16=bf16, fp8=fp8)), file=sys.stderr, flush=True)


def row(depth: int, batch: int, bf16: dict, fp8: dict) -> str:
    """One table row."""
    return (f"| d{depth} | {batch} | {cell(bf16)} | {cell(fp8)} | {bf16['compile_s']:.0f} / {fp8['compile_s']:.0f} "
            f"| `--depth={depth} --device-batch-size={batch}` |")


if __name__ == "__main__":
    main()
