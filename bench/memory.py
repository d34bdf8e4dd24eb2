"""Predicted peak memory per device of the train step (XLA's buffer assignment of the compiled step; nothing is
allocated) for depths x device batch sizes x memory options, as a Markdown table.

    python bench/memory.py                                   # d12 d20 d24 d26 at 8 16 32, T 2048, vocab 32768
    python bench/memory.py --depths 12 --batches 8 --options plain,chunk   # a subset (each cell is a compile)

Options: plain | chunk (--loss-chunk=256) | remat (--remat=block) | bf16emb (--embed-dtype=bfloat16) | all.
On CPU the attention is XLA's (it materialises the (B, H, T, T) scores), not cuDNN's flash kernel: the CPU figures
over-state what a GPU needs.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from jaxchat import memory
from jaxchat import mesh as meshlib
from jaxchat import optim
from jaxchat.model import config_for_depth
from jaxchat.step import abstract_training, compile_step

OPTIONS = {
    "plain": {},
    "chunk": dict(loss_chunk=256),
    "remat": dict(remat="block"),
    "bf16emb": dict(embed_dtype="bfloat16"),
    "all": dict(loss_chunk=256, remat="block", embed_dtype="bfloat16"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 20, 24, 26])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--options", default="plain,chunk,remat,bf16emb,all")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--compute-dtype", default="bfloat16")
    args = parser.parse_args(argv)
    options = args.options.split(",")
    mesh = meshlib.make_mesh(devices=jax.devices()[:1])
    print(f"Predicted peak memory per device (GiB), backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"jax {jax.__version__}, T={args.seq_len}, vocab {args.vocab_size}, {args.grad_accum} micro-batches, compute "
          f"{args.compute_dtype}; capacity {memory.fmt_bytes(memory.device_capacity()[0])}", flush=True)
    print("| depth | device batch | " + " | ".join(options) + " | compile s |", flush=True)
    print("|---|---|" + "---|" * len(options) + "---|", flush=True)
    for depth in args.depths:
        config = config_for_depth(depth, max_seq_len=args.seq_len, vocab_size=args.vocab_size)
        tx = optim.make_optimizer(model_dim=config.n_embd, weight_decay=0.2, muon_dtype=jnp.bfloat16,
                                  muon_stack_sharding=meshlib.muon_stack_sharding(mesh))
        for b in args.batches:
            cells, t0 = [], time.perf_counter()
            for name in options:
                _, step, (params_like, opt_like) = abstract_training(config, tx, mesh,
                                                                     compute_dtype=args.compute_dtype, **OPTIONS[name])
                compiled = compile_step(step, params_like, opt_like, mesh, device_batch_size=b,
                                               grad_accum=args.grad_accum, seq_len=args.seq_len)
                cells.append(f"{memory.peak_bytes(compiled) / memory.GiB:.1f}")
            seconds = (time.perf_counter() - t0) / len(options)
            print(f"| d{depth} | {b} | " + " | ".join(cells) + f" | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
