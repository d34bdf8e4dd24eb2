"""Evaluate a base model: the CORE metric and greedy samples (nanochat's scripts/base_eval.py, spec §8.5).

    python -m jaxchat.base_eval --model-tag d12 [--step N] [--eval core,sample] [--max-per-task N]
    python -m jaxchat.base_eval --nanochat-checkpoint model.npz --tokenizer-dir DIR [--bundle DIR] [--json out.json]

CORE results are written to $JAXCHAT_BASE_DIR/base_eval/base_model_{step:06d}.csv (Task, Accuracy, Centered and a
CORE row, as the reference writes them) and printed. `--nanochat-checkpoint` takes a .npz in the parity-fixture
format (config/*, param/*) or a nanochat model_XXXXXX.pt beside its meta_XXXXXX.json (needs torch).
"""

import argparse
import json
import os
import re

import jax
import jax.numpy as jnp

from jaxchat import core_eval
from jaxchat.common import UserError, base_dir, print0, run_main
from jaxchat.evaluate import SAMPLE_PROMPTS, greedy_generate

EVALS = ("core", "bpb", "sample")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_nanochat_checkpoint(path: str, compute_dtype=jnp.float32) -> tuple:
    """(model, step or None) from a parity-format .npz or a nanochat .pt checkpoint."""
    from jaxchat.convert import read_reference_npz, read_reference_pt
    from jaxchat.convert import model_from_reference

    if not os.path.exists(path):
        raise UserError(f"--nanochat-checkpoint {path} does not exist")
    if path.endswith(".pt"):
        config, state = read_reference_pt(path)
        match = re.search(r"model_(\d+)\.pt$", path)
        step = int(match.group(1)) if match else None
    else:
        config, state, _ = read_reference_npz(path)
        step = None
    return model_from_reference(config, state, compute_dtype=compute_dtype), step


def largest_model_tag() -> str:
    """The d{N} checkpoint directory with the largest N (the reference's default model)."""
    root = os.path.join(base_dir(), "base_checkpoints")
    tags = [t for t in (os.listdir(root) if os.path.isdir(root) else []) if re.fullmatch(r"d\d+", t)]
    if not tags:
        raise UserError(f"no model in {root}: pass --model-tag, or --nanochat-checkpoint FILE")
    return max(tags, key=lambda t: int(t[1:]))


def load_jaxchat_checkpoint(model_tag: str, step: int | None, compute_dtype=jnp.float32) -> tuple:
    """(model, step, data source it was trained on) of a jaxchat training checkpoint."""
    from jaxchat import checkpoint  # imported lazily: orbax is slow to import and not needed for .npz models

    model, meta = checkpoint.load_model_for_eval(model_tag, "last" if step is None else step,
                                                 compute_dtype=compute_dtype)
    return model, int(meta["step"]), meta["user_config"].get("data", "fineweb-edu")


def write_csv(path: str, results: dict) -> str:
    """The reference's CSV: fixed-width Task, Accuracy, Centered columns and a final CORE row; returns the text."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, r in results["tasks"].items():
        lines.append(f"{label:<35}, {r['accuracy']:<10.6f}, {r['centered']:<10.6f}")
    lines.append(f"{'CORE':<35}, {'':<10}, {results['core']:<10.6f}")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return text


def run_samples(model, tokenizer) -> None:
    """Greedy 16-token continuations of the fixed prompts, stopping at BOS or <|assistant_end|> (process 0 prints)."""
    from flax import nnx

    graphdef, params = nnx.split(model)
    prompts = [tokenizer.encode(p, prepend_bos=True) for p in SAMPLE_PROMPTS]
    stop = {tokenizer.bos_id}
    if "<|assistant_end|>" in tokenizer.enc.special_tokens_set:
        stop.add(tokenizer.enc.encode_single_token("<|assistant_end|>"))
    for prompt, out in zip(prompts, greedy_generate(graphdef, params, prompts, 16, stop)):
        print0(tokenizer.decode(prompt + out))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-tag", default=None, help="jaxchat checkpoint tag (default: the largest dN)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--nanochat-checkpoint", default=None, help="a parity-format .npz or a nanochat model_*.pt")
    parser.add_argument("--tokenizer-dir", default=None, help="directory holding tokenizer.pkl "
                        "(default: $JAXCHAT_BASE_DIR/tokenizer)")
    parser.add_argument("--bundle", default=None, help="CORE eval bundle directory (default: "
                        "$JAXCHAT_BASE_DIR/eval_bundle, downloaded when missing)")
    parser.add_argument("--eval", default="core,sample", help=f"comma-separated subset of {','.join(EVALS)}")
    parser.add_argument("--max-per-task", type=int, default=-1, help="examples per CORE task (-1 = all)")
    parser.add_argument("--tokens-per-device", type=int, default=None,
                        help="rows x padded length per device per forward pass (default: 16384, 2048 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype of the model")
    parser.add_argument("--json", default=None, help="also write per-example CORE results to this JSON file")
    args = parser.parse_args(argv)
    args.evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = sorted(set(args.evals) - set(EVALS))
    if unknown or not args.evals:
        parser.error(f"--eval={args.eval!r}: choose from {','.join(EVALS)}")
    if args.nanochat_checkpoint and (args.model_tag or args.step is not None):
        parser.error("--nanochat-checkpoint excludes --model-tag/--step")
    return args


def load_model(args: argparse.Namespace) -> tuple:
    """(model, tokenizer, name, step or None) for the command-line choice of model."""
    from jaxchat.tokenizer import Tokenizer, default_dir

    compute_dtype = DTYPES[args.dtype]
    if args.nanochat_checkpoint:
        model, step = load_nanochat_checkpoint(args.nanochat_checkpoint, compute_dtype)
        name, source = os.path.basename(args.nanochat_checkpoint), "fineweb-edu"
    else:
        model_tag = args.model_tag or largest_model_tag()
        model, step, source = load_jaxchat_checkpoint(model_tag, args.step, compute_dtype)
        name = f"base_model (step {step})"
    tokenizer = Tokenizer.load(args.tokenizer_dir or default_dir(source))  # the demo model uses the demo tokenizer
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"tokenizer vocabulary {tokenizer.vocab_size} != model vocabulary {model.config.vocab_size}: "
                        f"pass the model's --tokenizer-dir")
    return model, tokenizer, name, step


def main(argv=None) -> None:
    args = parse_args(argv)
    from jaxchat.mesh import init_distributed

    init_distributed()
    if args.dtype == "float32":
        # A float32 evaluation means float32 matmuls (no TF32/bf16 passes), so results match the reference's CPU runs.
        jax.config.update("jax_default_matmul_precision", "highest")
    if "bpb" in args.evals:
        raise UserError("--eval bpb is not wired into base_eval yet (it needs the validation data loader); "
                        "use --eval core,sample")
    # Check the bundle before loading the model: a missing bundle should fail in a second, not after a long load.
    bundle = core_eval.find_bundle(args.bundle) if "core" in args.evals else None
    model, tokenizer, name, step = load_model(args)
    if "sample" in args.evals:
        run_samples(model, tokenizer)
    if "core" not in args.evals:
        return
    results = core_eval.evaluate_core(model, tokenizer, bundle_dir=bundle, max_per_task=args.max_per_task,
                                      tokens_per_device=args.tokens_per_device)
    if jax.process_index() != 0:
        return
    stem = f"base_model_{step:06d}" if step is not None else os.path.splitext(os.path.basename(name))[0]
    csv_path = os.path.join(base_dir(), "base_eval", f"{stem}.csv")
    text = write_csv(csv_path, results)
    print("=" * 80)
    print(f"Model: {name}")
    print("=" * 80)
    print(text, end="", flush=True)
    print(f"wrote {csv_path}")
    if args.json:
        out = {"core": results["core"], "tasks": {label: {k: r[k] for k in ("accuracy", "centered", "correct")}
                                                  for label, r in results["tasks"].items()}}
        with open(args.json, "w") as f:
            json.dump(out, f)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
