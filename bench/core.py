"""Benchmark a full CORE pass: wall time (cold, with compilation, then warm), compilations and padding efficiency.

    python bench/core.py --nanochat-checkpoint MODEL.npz --tokenizer-dir DIR --bundle DIR [--max-per-task 500]
    python bench/core.py --model-tag d12 [--step N] [--bundle DIR]

On CPU with the small fixture (../shared/fixtures/core_small: model.npz, tokenizer/, eval_bundle/) it runs in seconds.
"""

import argparse
import json
import os
import time

import jax

from jaxchat.base_eval import DTYPES, load_model
from jaxchat.eval import core_bundle, core_eval
from jaxchat.runtime import cli
from jaxchat.runtime.common import check_output, print0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-tag", default=None)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--nanochat-checkpoint", default=None, help="a parity-format .npz or a nanochat model_*.pt")
    parser.add_argument("--tokenizer-dir", default=None)
    parser.add_argument("--bundle", default=None, help="eval bundle directory (default: $JAXCHAT_BASE_DIR/eval_bundle)")
    parser.add_argument("--max-per-task", type=int, default=500)
    parser.add_argument("--tokens-per-device", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--passes", type=int, default=2, help="the first pass compiles, later ones are warm")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    bundle = core_bundle.find_bundle(args.bundle)
    if args.json:
        args.json = check_output(args.json, "--json")  # before the passes, not after them
    model, tokenizer, name = load_model(args)[:3]

    compiles = []

    def listener(event, *_, **__):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    passes = []
    for i in range(args.passes):
        n0, t0 = len(compiles), time.perf_counter()
        result = core_eval.evaluate_core(model, tokenizer, bundle_dir=bundle, max_per_task=args.max_per_task,
                                         tokens_per_device=args.tokens_per_device)
        passes.append({"pass": i, "wall_s": round(time.perf_counter() - t0, 3), "core": result["core"],
                       "compilations": result["compilations"], "backend_compiles": len(compiles) - n0,
                       **result["stats"]})
    jax.monitoring.unregister_event_duration_listener(listener)

    print0(f"model {name} | devices {jax.device_count()} x {jax.devices()[0].device_kind} | "
           f"max_per_task {args.max_per_task} | dtype {args.dtype}")
    for p in passes:
        print0(f"pass {p['pass']}: {p['wall_s']:.2f}s | CORE {p['core']:.4f} | compilations {p['compilations']} "
               f"(XLA: {p['backend_compiles']}) | {p['batches']} batches, {p['rows']} rows, "
               f"{p['tokens']} tokens, padding efficiency {p['tokens'] / max(p['padded_tokens'], 1):.1%}")
    if args.json and jax.process_index() == 0:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": name, "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
                       "max_per_task": args.max_per_task, "passes": passes}, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
