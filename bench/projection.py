"""The train step's projected time on GPUs that are not here, this checkout against a baseline commit, in one run:
each side's optimised XLA:GPU program (`python -m jaxchat.aot`, dumped with --xla_dump_to) projected kernel by kernel
by a roofline model of XLA:GPU programs given with --roofline (not part of jaxchat: an independent instrument). One
JSON line per side, then the ratio. A projection, not a measurement.

    python bench/projection.py --roofline=PATH/roofline.py --base=49453cc -- --config=configs/speedrun.py
    python bench/projection.py --roofline=PATH/roofline.py --base=49453cc --tokens=65536 --flops=4.945112e9 \\
        -- --config=configs/d24.py

--tokens: tokens per step and device (the record command: 131072; configs/d24.py: 65536); --flops: FLOPs per token
(nanochat's count: 4.775226e9 and 4.945112e9), for MFU. The baseline is checked out in a temporary git worktree and
compiled by the same Python; flags after -- go to jaxchat.aot on both sides.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_STEP = re.compile(r"projected step: ([\d.]+) ms \(compute stream ([\d.]+) ms, exposed collectives ([\d.]+) ms")
_MFU = re.compile(r"tokens/s per GPU ([\d,]+)\s+MFU \(nanochat's\) ([\d.]+)%")
_COLLECTIVES = re.compile(r"^collectives\s+[\d.]+\s+[\d.]+%\s+[\d.]+\s+([\d.]+)", re.M)


def project(checkout: Path, aot_flags: list[str], args, dump: str) -> dict:
    """Compile the step of `checkout` with its own jaxchat, dump the program, project it."""
    env = dict(os.environ, PYTHONPATH=str(checkout), XLA_FLAGS=f"--xla_dump_to={dump}")
    done = subprocess.run([sys.executable, "-m", "jaxchat.aot", *aot_flags], cwd=checkout, env=env,
                          capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"jaxchat.aot in {checkout} failed:\n{done.stderr[-3000:]}")
    compiled = json.loads(lines[-1])
    text = subprocess.run([sys.executable, args.roofline, dump, f"--tokens-per-step-per-device={args.tokens}",
                           f"--flops-per-token={args.flops}"], capture_output=True, text=True, check=True).stdout
    step, mfu, wire = _STEP.search(text), _MFU.search(text), _COLLECTIVES.search(text)
    return dict(step_ms=float(step.group(1)), exposed_collectives_ms=float(step.group(3)),
                tokens_per_s_per_gpu=int(mfu.group(1).replace(",", "")), mfu=round(float(mfu.group(2)) / 100, 3),
                collective_gb=float(wire.group(1)) if wire else 0.0, peak_gib=round(compiled["peak_bytes"] / 2**30, 1),
                compile_s=compiled["compile_s"], remat=compiled["remat"], problems=compiled["problems"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roofline", required=True, help="the roofline model's script (DUMP_DIR -> projection)")
    parser.add_argument("--base", default="49453cc", help="the baseline commit")
    parser.add_argument("--tokens", type=int, default=131072, help="tokens per step and device")
    parser.add_argument("--flops", type=float, default=4.775226e9, help="FLOPs per token (nanochat's count)")
    args, aot_flags = parser.parse_known_args(argv)
    aot_flags = [f for f in aot_flags if f != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base],
                       check=True, capture_output=True)
        try:
            rows = {"base": project(base, aot_flags, args, f"{tmp}/dump_base"),
                    "head": project(ROOT, aot_flags, args, f"{tmp}/dump_head")}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    for side, row in rows.items():
        print(json.dumps(dict(side=side, commit=args.base if side == "base" else "HEAD", flags=aot_flags, **row)))
    print(json.dumps(dict(speedup=round(rows["base"]["step_ms"] / rows["head"]["step_ms"], 3),
                          collective_gb_ratio=round(rows["head"]["collective_gb"] / max(rows["base"]["collective_gb"],
                                                                                         1e-9), 3))))


if __name__ == "__main__":
    main()
