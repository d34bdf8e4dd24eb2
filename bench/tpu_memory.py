"""XLA:TPU's predicted peak memory per chip of the train step on TPU slices (jaxchat.aot: libtpu, no TPU), one row per
slice and flags, with the device batch and remat policy `--device-batch-size=auto` and `--remat=auto` pick there: the
README's "TPUs" table.

    python bench/tpu_memory.py              # every row of ROWS (each a compile: 1 to 60 minutes on 2 cores)
    python bench/tpu_memory.py --rows 0 1   # some of them

Each row is `python -m jaxchat.aot --target=T --devices=N <flags>` (with --device-batch-size=auto), jaxchat.train's
defaults otherwise (T 2048, nanochat's vocabulary and total batch, --remat=auto), run in its own process, one at a
time (a d24 compile takes several GB of RAM).
"""

import argparse
import json
import subprocess
import sys

# (generation, chips, flags). The first is tests/test_aot.py's V5E_SMALL, the row the tests compile again.
ROWS = (
    ("v5e", 8, ("--depth=2", "--aspect-ratio=384", "--max-seq-len=256", "--device-batch-size=auto",
                "--total-batch-size=2048", "--fsdp=2")),
    ("v5e", 8, ("--depth=12", "--device-batch-size=auto")),
    ("v6e", 8, ("--depth=24", "--fsdp=8", "--device-batch-size=auto")),
    ("v5p", 4, ("--depth=24", "--device-batch-size=auto")),
    ("v6e", 8, ("--depth=26", "--fsdp=8", "--device-batch-size=auto")),
)


def compile_row(target: str, chips: int, flags: tuple[str, ...]) -> dict:
    """jaxchat.aot's JSON line for one row (exit code 1, a step that does not fit or has a problem, still has one)."""
    argv = [sys.executable, "-m", "jaxchat.aot", f"--target={target}", f"--devices={chips}", *flags]
    done = subprocess.run(argv, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"{' '.join(argv[1:])} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def row(flags: tuple[str, ...], r: dict) -> str:
    """One table row: the slice, the flags, what auto picked, the peak against the usable HBM, splash, compile time."""
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    refused = sorted((int(b) for b, v in r["auto_tried"].items() if v is None), reverse=True)
    splash = "/".join(f"{n:g}" for n in r["splash_per_layer"])
    return (f"| {r['target']} x {r['devices']} ({r['hosts']} host{'s' if r['hosts'] > 1 else ''}) | "
            f"`{' '.join(flags)}` | {r['mesh']['data']} x {r['mesh']['fsdp']} | {r['device_batch_size']} x "
            f"{r['grad_accum']}{' (refused: ' + ', '.join(map(str, refused)) + ')' if refused else ''} | "
            f"{r['remat']} | {gib(r['peak_bytes'])} of {gib(r['usable_bytes'])}{'' if r['fits'] else ' over'} | "
            f"{splash} | {'none' if not r['problems'] else '; '.join(r['problems'])} | {r['compile_s']:.0f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=list(range(len(ROWS))), help="indices into ROWS")
    args = parser.parse_args(argv)
    import jax
    import libtpu
    print(f"XLA:TPU's predicted peak per chip (GiB) of the usable HBM; jax {jax.__version__}, libtpu "
          f"{libtpu.__version__}; device batch and remat: --device-batch-size=auto's and --remat=auto's choice "
          f"('refused': device batches XLA:TPU would not compile, out of HBM); splash: fwd/dq/dkv kernels per layer")
    print("| slice | flags | mesh data x fsdp | device batch x micro-batches | remat | peak GiB | splash | problems | "
          "compile s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for i in args.rows:
        target, chips, flags = ROWS[i]
        r = compile_row(target, chips, flags)
        print(row(flags, r), flush=True)
        print(json.dumps(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
