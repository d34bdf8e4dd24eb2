"""Compile time and HLO size of the real train step per depth: the layer scan against unrolled layers (the baseline),
measured in the same run. One JSON line per (depth, layers), then a markdown table.

    python bench/compile.py --depths=12,20,26                                  # real shapes (slow on CPU)
    python bench/compile.py --depths=8,16,32 --aspect-ratio=0 --width=256 --seq-len=64   # fixed width: depth only

"HLO ops" counts the instructions of the optimised HLO module XLA compiled (all computations, loop bodies once):
with the scan it stays flat in depth, unrolled it grows with every layer.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from jaxchat.training import recipe

from jaxchat.model import mesh as meshlib
from jaxchat.runtime import xla_flags
from jaxchat.training import optim
from jaxchat.training.config import config_for_depth
from jaxchat.training.config import optimizer_flags
from jaxchat.training.step import abstract_training, step_input_specs


def hlo_op_count(compiled: jax.stages.Compiled) -> int:
    """Instructions in the optimised HLO text (lines of the form `name = shape op(...)`)."""
    return sum(1 for line in compiled.as_text().splitlines() if " = " in line and not line.lstrip().startswith("//"))


def measure(depth: int, scan_layers: bool, args) -> dict:
    """Lower and compile the step for one depth; nothing is allocated."""
    aspect_ratio = args.aspect_ratio or max(1, args.width // depth)
    config = config_for_depth(depth, aspect_ratio=aspect_ratio, head_dim=args.head_dim, max_seq_len=args.seq_len,
                              vocab_size=args.vocab_size, window_pattern=args.window_pattern)
    mesh = meshlib.make_mesh(1)
    tx = optim.make_optimizer(**optimizer_flags(), **recipe.get("348fbb3").optimizer_options(), model_dim=config.n_embd, weight_decay=0.2, muon_dtype=jnp.dtype(args.muon_dtype))
    _, train_step, (params_like, opt_like) = abstract_training(config, tx, mesh, compute_dtype=args.compute_dtype,
                                                               scan_layers=scan_layers)
    t0 = time.perf_counter()
    lowered = train_step.lower(params_like, opt_like, *step_input_specs(
        mesh, args.device_batch_size, args.grad_accum, args.seq_len))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return dict(depth=depth, n_embd=config.n_embd, layers="scan" if scan_layers else "unrolled", lower_s=t1 - t0,
                compile_s=t2 - t1, hlo_ops=hlo_op_count(compiled), backend=jax.default_backend(),
                device=jax.devices()[0].device_kind, jax=jax.__version__)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="12,20,26", help="comma-separated depths")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="0: --width at every depth")
    parser.add_argument("--width", type=int, default=256, help="model width when --aspect-ratio=0")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--window-pattern", default="SSSL")
    parser.add_argument("--device-batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--compute-dtype", default="bfloat16")
    parser.add_argument("--muon-dtype", default="bfloat16")
    parser.add_argument("--layers", default="scan,unrolled", help="which to measure: scan, unrolled or both")
    args = parser.parse_args(argv)
    xla_flags.apply()

    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        for layers in args.layers.split(","):
            rows.append(measure(depth, layers == "scan", args))
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["depth"], r["layers"]): r for r in rows}
    print(f"\n{rows[0]['device']} ({rows[0]['backend']}), jax {rows[0]['jax']}: compile seconds / HLO ops")
    print("| depth | width | scan | unrolled | unrolled / scan |\n|---|---|---|---|---|")
    for depth in dict.fromkeys(r["depth"] for r in rows):
        scan, unrolled = by.get((depth, "scan")), by.get((depth, "unrolled"))
        cell = lambda r: f"{r['compile_s']:.1f} s / {r['hlo_ops']:,}" if r else "-"  # noqa: E731
        ratio = (f"{unrolled['compile_s'] / scan['compile_s']:.2f}x / {unrolled['hlo_ops'] / scan['hlo_ops']:.2f}x"
                 if scan and unrolled else "-")
        print(f"| {depth} | {(scan or unrolled)['n_embd']} | {cell(scan)} | {cell(unrolled)} | {ratio} |")
    return rows


if __name__ == "__main__":
    main()
