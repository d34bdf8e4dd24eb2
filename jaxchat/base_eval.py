"""Evaluate a base model: the CORE metric, bits per byte and greedy samples (nanochat's scripts/base_eval.py).

    python -m jaxchat.base_eval --model-tag d12 [--step N] [--eval core,bpb,sample] [--max-per-task N]
    python -m jaxchat.base_eval --nanochat-checkpoint model.npz --tokenizer-dir DIR [--bundle DIR] [--json out.json]

CORE results are written to $JAXCHAT_BASE_DIR/base_eval/base_model_{step:06d}.csv (Task, Accuracy, Centered and a
CORE row, as nanochat's scripts/base_eval.py main writes them) and printed. `--eval bpb` is nanochat's (added after
348fbb3, at 92d63d4): bits per byte on the train and val splits of the data the model was trained on.
`--nanochat-checkpoint` takes a .npz in the parity-fixture format (config/*, param/*) or a nanochat model_XXXXXX.pt
beside its meta_XXXXXX.json (needs torch).
"""

import argparse
import json
import os
import re
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxchat.data import dataset
from jaxchat.data.tokenizer import Tokenizer, check_recorded, default_dir
from jaxchat.eval import core_bundle, core_eval
from jaxchat.eval.loss_eval import SAMPLE_PROMPTS, evaluate_bpb, greedy_generate, make_bpb_step
from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import GPT, abstract_model
from jaxchat.runtime import cli, compile_cache
from jaxchat.runtime.common import (JAXCHAT_ONLY, UserError, base_dir, check_output, cli_parser, print0, replacing,
                            user_path)

EVALS = ("core", "bpb", "sample")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_nanochat_checkpoint(path: str, compute_dtype=jnp.float32) -> tuple:
    """(model, step or None) from a parity-format .npz or a nanochat .pt checkpoint."""
    from jaxchat.interop import nanochat_ckpt
    from jaxchat.interop.convert import model_from_reference, read_reference_npz

    if not os.path.exists(path):
        raise UserError(f"--nanochat-checkpoint {path} does not exist")
    if path.endswith(".pt"):
        config, state, _ = nanochat_ckpt.read_checkpoint(path)
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


def open_checkpoint(model_tag: str, step: int | str = "last"):
    """(reader, step, meta record) of a saved jaxchat checkpoint, nothing restored yet."""
    from jaxchat.runtime import checkpoint  # imported lazily: orbax is slow to import and not needed for .npz models

    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(model_tag), async_save=False, step_flag="--step")
    step = ckpt.resolve_step(step)
    return ckpt, step, ckpt.read_meta(step)


def restore_model(ckpt, step: int, meta: dict, compute_dtype=None) -> tuple[GPT, dict]:
    """(model, meta) of an opened checkpoint, parameters on this process's first device (the reader is closed).

    As nanochat/checkpoint_manager.py load_model with phase="eval".
    """
    from jaxchat.interop.convert import config_from_dict

    config = config_from_dict(meta["model_config"])
    kwargs = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
    graphdef, abstract = nnx.split(abstract_model(config, **kwargs))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # jax.devices()[0] is process 0's
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(abstract))
    params, _, meta = ckpt.restore(step, target)
    ckpt.close()
    return nnx.merge(graphdef, params), meta


def write_csv(path: str, results: dict) -> str:
    """nanochat's CSV (scripts/base_eval.py main): fixed-width Task, Accuracy, Centered columns and a final CORE row;
    returns the text."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, r in results["tasks"].items():
        lines.append(f"{label:<35}, {r['accuracy']:<10.6f}, {r['centered']:<10.6f}")
    lines.append(f"{'CORE':<35}, {'':<10}, {results['core']:<10.6f}")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)
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


def split_bpb(model: GPT, tokenizer: Tokenizer, source: str, device_batch_size: int, split_tokens: int) -> dict:
    """{"train": bpb, "val": bpb} over the first split_tokens tokens of each split (nanochat's scripts/base_eval.py
    main at 92d63d4, --eval bpb): the model replicated over every device, rows split over them."""
    seq_len = model.config.sequence_len
    tokens_per_step = device_batch_size * seq_len * jax.device_count()
    steps = split_tokens // tokens_per_step
    if steps < 1:
        raise UserError(f"--split-tokens={split_tokens} is less than one batch of {tokens_per_step} tokens "
                        f"(--device-batch-size x sequence length {seq_len} x {jax.device_count()} devices)")
    if split_tokens % tokens_per_step:
        print0(f"Adjusted split_tokens to {steps * tokens_per_step} (must be divisible by {tokens_per_step})")
    graphdef, params, mesh = core_eval.model_on_mesh(model)
    rows = meshlib.row_sharding(mesh)
    bpb_step, token_bytes = make_bpb_step(graphdef), jnp.asarray(tokenizer.get_token_bytes())
    results = {}
    for split in ("train", "val"):
        from jaxchat.data.dataloader import DataLoader  # grain: imported only when bpb is asked for

        loader = DataLoader(tokenizer, dataset.list_shards(source, split), device_batch_size * jax.local_device_count(),
                            seq_len)
        batches = (tuple(jax.make_array_from_process_local_data(rows, a) for a in batch) for batch in loader)
        results[split] = evaluate_bpb(bpb_step, params, batches, steps, token_bytes)
        loader.close()
        print0(f"{split} bpb: {results[split]:.6f}")
    return results


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m jaxchat.base_eval` (nanochat's scripts/base_eval.py flags, plus jaxchat's)."""
    p = cli_parser(__doc__)
    p.add_argument("--eval", default="core,sample", help=f"comma-separated evaluations to run, from {','.join(EVALS)}")
    model = p.add_argument_group("model")
    model.add_argument("--model-tag", default=None, help="checkpoint directory under base_checkpoints "
                       "(default: the largest dN)")
    model.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the last)")
    model.add_argument("--nanochat-checkpoint", default=None, type=user_path,
                       help=JAXCHAT_ONLY + "evaluate a parity-format .npz or a nanochat model_*.pt instead")
    model.add_argument("--tokenizer-dir", default=None, type=user_path,
                       help=JAXCHAT_ONLY + "directory holding tokenizer.pkl "
                       "(default: the one of the checkpoint's data, $JAXCHAT_BASE_DIR/tokenizer[_demo])")
    model.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                       help=JAXCHAT_ONLY + "compute dtype of the model")
    core = p.add_argument_group("CORE")
    core.add_argument("--max-per-task", type=int, default=-1, help="examples per CORE task (-1: all)")
    core.add_argument("--bundle", default=None, type=user_path, help=JAXCHAT_ONLY + "CORE eval bundle directory "
                      "(default: $JAXCHAT_BASE_DIR/eval_bundle, downloaded when missing)")
    core.add_argument("--tokens-per-device", type=int, default=None, help=JAXCHAT_ONLY + "rows x padded length "
                      "per device per CORE forward pass (default: 16384, 2048 on CPU)")
    core.add_argument("--json", default=None, type=user_path,
                      help=JAXCHAT_ONLY + "also write per-example CORE results to this file")
    bpb = p.add_argument_group("bits per byte")
    bpb.add_argument("--device-batch-size", type=int, default=32, help="rows per device per bpb forward pass")
    bpb.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens evaluated per split for bpb")
    p.add_argument("--compile-cache", default=compile_cache.AUTO, metavar="DIR",
                   help=JAXCHAT_ONLY + "directory of JAX's persistent compilation cache (auto = "
                   "$JAX_COMPILATION_CACHE_DIR, else $JAXCHAT_BASE_DIR/jax_cache; '' or off = no cache)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    args.evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = sorted(set(args.evals) - set(EVALS))
    if unknown or not args.evals:
        p.error(f"--eval={args.eval!r}: choose from {','.join(EVALS)}")
    if args.nanochat_checkpoint and (args.model_tag or args.step is not None):
        p.error("--nanochat-checkpoint excludes --model-tag/--step")
    return args


class Loaded(NamedTuple):
    """A model to evaluate, with its tokenizer, display name, step (None if unknown) and training data source."""

    model: GPT
    tokenizer: Tokenizer
    name: str
    step: int | None
    source: str


def load_model(args: argparse.Namespace) -> Loaded:
    """The model, tokenizer, name, step and data source of the command-line choice of model; the tokenizer is the one
    the checkpoint records (checked before the parameters are read)."""
    from jaxchat.interop import nanochat_ckpt

    compute_dtype = DTYPES[args.dtype]
    if args.nanochat_checkpoint:
        # A nanochat base directory's tokenizer/ is the one its models were trained with.
        recorded_at = nanochat_ckpt.tokenizer_of(args.nanochat_checkpoint)
        if not args.nanochat_checkpoint.endswith(".pt") or not os.path.exists(f"{recorded_at}/tokenizer.pkl"):
            recorded_at = None
        if recorded_at is None and not args.tokenizer_dir:  # nothing says which tokenizer: never the base dir's
            if args.nanochat_checkpoint.endswith(".pt"):
                nanochat_ckpt.check_tokenizer_present(f"--nanochat-checkpoint={args.nanochat_checkpoint}",
                                                      args.nanochat_checkpoint, flag="--tokenizer-dir")
            raise UserError(f"--nanochat-checkpoint={args.nanochat_checkpoint} records no tokenizer: pass "
                            f"--tokenizer-dir=DIR naming the one it was made with")
        tokenizer = Tokenizer.load(args.tokenizer_dir or recorded_at or default_dir("fineweb-edu"))
        if recorded_at and args.tokenizer_dir:
            tokenizer = check_recorded(tokenizer, Tokenizer.load(recorded_at).fingerprint(), args.nanochat_checkpoint,
                                       flag="--tokenizer-dir", chosen=True, recorded_at=recorded_at)
        model, step = load_nanochat_checkpoint(args.nanochat_checkpoint, compute_dtype)
        name, source = os.path.basename(args.nanochat_checkpoint), "fineweb-edu"
        which = f"{args.nanochat_checkpoint}" + (f" (step {step})" if step is not None else "")
    else:
        from jaxchat.runtime.checkpoint import recorded_tokenizer

        model_tag = args.model_tag or largest_model_tag()
        ckpt, step, meta = open_checkpoint(model_tag, "last" if args.step is None else args.step)
        source = meta["user_config"].get("data", "fineweb-edu")
        tokenizer = Tokenizer.load(args.tokenizer_dir or default_dir(source))  # the demo model uses the demo tokenizer
        tokenizer = check_recorded(tokenizer, recorded_tokenizer(meta), f"step {step} of {model_tag}",
                                   flag="--tokenizer-dir", chosen=bool(args.tokenizer_dir))
        model, _ = restore_model(ckpt, step, meta, compute_dtype)
        name = f"base_model (step {step})"
        which = f"step {step} of {model_tag} ({ckpt.directory})"
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"tokenizer vocabulary {tokenizer.vocab_size} != model vocabulary {model.config.vocab_size}: "
                        f"pass the model's --tokenizer-dir")
    print0(f"Evaluating {which}")  # every evaluation says which model and step (--eval=bpb said neither)
    return Loaded(model, tokenizer, name, step, source)


def main(argv=None) -> None:
    """`python -m jaxchat.base_eval`'s evaluations in this process (tests): nothing of the process is set up (SETUP);
    in-process callers keep their jax config."""
    run_evals(parse_args(argv))


def run_evals(args: argparse.Namespace) -> None:
    """The evaluations these flags ask for, after the checks that fail fast; CORE's results written and printed."""
    if args.dtype == "float32":
        # A float32 evaluation means float32 matmuls (no TF32/bf16 passes), so results match nanochat's CPU runs.
        jax.config.update("jax_default_matmul_precision", "highest")
    # Check the bundle and the outputs before loading the model: they should fail in a second, not after a long load
    # or, for the outputs, after the whole evaluation.
    bundle = core_bundle.find_bundle(args.bundle) if "core" in args.evals else None
    if "core" in args.evals and jax.process_index() == 0:
        check_output(os.path.join(base_dir(), "base_eval"), "the CORE results directory", directory=True)
        if args.json:
            args.json = check_output(args.json, "--json")
    if bundle:  # --max-per-task against its tasks' few-shot counts (nanochat #550), and every task file read: a
        # broken or too short one is found now, as training finds it (core_eval.check_bundle), not at its turn
        core_eval.check_bundle(bundle, args.max_per_task, "--max-per-task")
    model, tokenizer, name, step, source = load_model(args)
    if "sample" in args.evals:
        run_samples(model, tokenizer)
    if "bpb" in args.evals:
        split_bpb(model, tokenizer, source, args.device_batch_size, args.split_tokens)
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
        os.makedirs(os.path.dirname(args.json), exist_ok=True)  # checked at start-up (check_output)
        with replacing(args.json) as tmp, open(tmp, "w") as f:
            json.dump(out, f)
        print(f"wrote {args.json}")


# `python -m jaxchat.base_eval`: the persistent compilation cache (--compile-cache) and the multi-process start (the
# environment's JAX_COORDINATOR_ADDRESS, SLURM, a TPU slice: distributed.init_distributed)
SETUP = cli.Setup(compile_cache=True, distributed=True)

if __name__ == "__main__":
    cli.run(run_evals, sys.argv[1:], parse=parse_args, setup=SETUP)
