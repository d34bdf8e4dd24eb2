"""Projected time to each run's horizon on 8 GPUs: d12, d20, d24, d26 (their configs) x recipe 348fbb3 / 92d63d4 x
bf16 / --fp8, as the Markdown table of docs/performance.md. Each (depth, recipe, precision) is compiled once by
XLA:GPU for 8 H100s (`python -m jaxchat.aot --reproject=h200,a100`, no GPU) and that one program is projected by
jaxchat.training.projection with the H100's, the H200's and the A100's figures (jaxchat.runtime.targets): the H200 and
A100 columns are the H100's program re-projected, not programs compiled for them. The A100 has no fp8 (n/a). A roofline
model of XLA's optimised program, not a measurement.

    python bench/horizon.py                          # all 16 compiles (20-200 s each on 2 cores)
    python bench/horizon.py --depths 12 24 --recipes 92d63d4
"""

import argparse
import json
import subprocess
import sys

GPUS = ("h100", "h200", "a100")


def compile_row(depth: int, recipe: str, fp8: bool) -> dict:
    """jaxchat.aot's JSON line for configs/d{depth}.py under this recipe and precision."""
    argv = [sys.executable, "-m", "jaxchat.aot", "--target=h100", "--devices=8", "--reproject=h200,a100",
            f"--config=configs/d{depth}.py", f"--recipe={recipe}"] + (["--fp8"] if fp8 else [])
    done = subprocess.run(argv, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"{' '.join(argv[1:])} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def cells(r: dict, fp8: bool) -> list[str]:
    """Per GPU: hours to the horizon, step ms and MFU (nanochat's); n/a for fp8 on a GPU without it."""
    projections = {"h100": r["projection"], **r["reprojections"]}
    out = []
    for gpu in GPUS:
        p = projections[gpu]
        if fp8 and gpu == "a100":
            out.append("n/a (no fp8)")
        else:
            out.append(f"{p['horizon_s'] / 3600:.2f} h ({p['step_s'] * 1e3:.0f} ms, {p['mfu']:.0%})")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 20, 24, 26])
    parser.add_argument("--recipes", nargs="+", default=["348fbb3", "92d63d4"])
    args = parser.parse_args(argv)
    import jax
    print(f"<!-- table:horizon -->\n8 GPUs, each config's horizon; jax {jax.__version__}; the H100's program, "
          "re-projected for H200 and A100")
    print("| config | recipe | precision | steps | device batch | " + " | ".join(
        f"{g.upper()}: hours (step, MFU)" for g in GPUS) + " |")
    print("|---" * (5 + len(GPUS)) + "|")
    for depth in args.depths:
        for recipe in args.recipes:
            for fp8 in (False, True):
                r = compile_row(depth, recipe, fp8)
                p, over = r["projection"], "" if r["fits"] else " (over 90% of memory)"
                print(f"| d{depth} | {recipe} | {'fp8' if fp8 else 'bf16'} | {p['horizon_steps']:,} | "
                      f"{r['device_batch_size']} x {r['grad_accum']}{over} | " + " | ".join(cells(r, fp8)) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
