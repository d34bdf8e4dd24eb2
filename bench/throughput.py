"""Throughput of the real train step on synthetic tokens: tokens/s, MFU (as nanochat's
scripts/base_train.py computes it at 348fbb3), median step time, compile time
and peak memory, printed as one JSON line, then as the README performance table's row.

    python bench/throughput.py --depth=24 --device-batch-size=16            # real shapes: T 2048, vocab 32768
    python bench/throughput.py --depth=24 --device-batch-size=16 --fp8      # the same with fp8 matmuls
    python bench/throughput.py --depth=2 --aspect-ratio=32 --head-dim=32 --seq-len=64 --vocab-size=256 \\
        --device-batch-size=2 --steps=3 --warmup=1                          # CI-sized, seconds on CPU
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat.training import recipe

from jaxchat.model import fp8
from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import estimate_flops
from jaxchat.runtime import backend, host_memory
from jaxchat.runtime import xla_flags
from jaxchat.runtime.targets import peak_flops
from jaxchat.training import memory
from jaxchat.training import optim
from jaxchat.training.config import config_for_depth
from jaxchat.training.config import optimizer_flags
from jaxchat.training.step import compile_step, init_training


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--window-pattern", default="SSSL")
    parser.add_argument("--device-batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compute-dtype", default=None, help="default: bfloat16 on GPU, float32 elsewhere")
    parser.add_argument("--muon-dtype", default=None, help="default: bfloat16 on GPU, float32 elsewhere")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--loss-chunk", type=int, default=0)
    parser.add_argument("--embed-dtype", default="float32")
    parser.add_argument("--fp8", action="store_true", help="qualifying dense layers in fp8, as train --fp8 (MFU stays "
                                                           "against the bf16 peak)")
    parser.add_argument("--no-xla-flags", action="store_true", help="without jaxchat's GPU XLA flags (baseline)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.no_xla_flags:
        xla_flags.apply()  # before the backend starts, as `python -m jaxchat.train` does
    host_memory.keep_freed_memory()  # as jaxchat.train does; --no-xla-flags leaves out the XLA flags only

    config = config_for_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                              max_seq_len=args.seq_len, vocab_size=args.vocab_size, window_pattern=args.window_pattern)
    mesh = meshlib.make_mesh(args.fsdp)
    run_backend = backend.for_mesh(mesh)
    compute_dtype, muon_dtype = (run_backend.default_dtype(flag) for flag in (args.compute_dtype, args.muon_dtype))
    tx = optim.make_optimizer(**optimizer_flags(), **recipe.get("348fbb3").optimizer_options(), model_dim=config.n_embd, weight_decay=0.2, muon_dtype=jnp.dtype(muon_dtype),
                              muon_stack_sharding=meshlib.muon_stack_sharding(mesh))
    _, params, opt_state, train_step, (params_like, opt_like) = init_training(
        config, tx, mesh, seed=0, compute_dtype=compute_dtype, remat=args.remat, loss_chunk=args.loss_chunk,
        embed_dtype=args.embed_dtype, fp8=args.fp8)
    if args.fp8 and (note := fp8.no_speedup_note(run_backend)):
        print(note, flush=True)
    t0 = time.perf_counter()
    compiled = compile_step(train_step, params_like, opt_like, mesh, device_batch_size=args.device_batch_size,
                                   grad_accum=args.grad_accum, seq_len=args.seq_len)
    compile_s = time.perf_counter() - t0

    rows = args.device_batch_size * mesh.size
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, (args.grad_accum, rows, args.seq_len + 1),
                                               dtype=np.int32)
    inputs, targets = (jax.device_put(a, meshlib.batch_sharding(mesh)) for a in (tokens[..., :-1], tokens[..., 1:]))
    values = optim.schedule_values(0, num_iterations=1000, warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0,
                                   weight_decay=0.2)
    schedule = optim.schedule_arrays(values)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, inputs, targets, schedule)
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)

    dt = statistics.median(times)
    tokens_per_step = args.grad_accum * rows * args.seq_len
    flops_per_token = estimate_flops(config)
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind) * jax.device_count()
    stats = device.memory_stats()
    result = dict(
        depth=args.depth, n_embd=config.n_embd, seq_len=args.seq_len, vocab_size=args.vocab_size,
        device_batch_size=args.device_batch_size, grad_accum=args.grad_accum, mesh=dict(mesh.shape),
        device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__, compute_dtype=compute_dtype,
        remat=args.remat, loss_chunk=args.loss_chunk, embed_dtype=args.embed_dtype, fp8=args.fp8, mfu_peak="bf16",
        xla_flags=os.environ.get("XLA_FLAGS", ""), tokens_per_step=tokens_per_step, step_time_s=dt,
        step_times_s=times, tokens_per_s=tokens_per_step / dt,
        mfu=100 * flops_per_token * tokens_per_step / dt / peak, compile_s=compile_s,
        predicted_peak_bytes=memory.peak_bytes(compiled),
        peak_bytes=stats["peak_bytes_in_use"] if stats else None,
        host_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        loss=float(metrics["loss"]) if isinstance(metrics, dict) else float(metrics))
    print(json.dumps(result), flush=True)
    print(readme_row(result), flush=True)
    return result


def readme_row(r: dict) -> str:
    """The README performance table's row for this measurement (GPU, jax, commit, depth, batch, figures)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "-"
    peak = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r["peak_bytes"] else "-"
    depth = f"{r['depth']} fp8" if r.get("fp8") else r["depth"]
    return (f"| {r['device']} | {r['jax']} | {commit} | {depth} | {r['device_batch_size']} | "
            f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1f}% | {r['step_time_s'] * 1000:.0f} ms | {r['compile_s']:.0f} s | "
            f"{peak} |")


if __name__ == "__main__":
    main()
