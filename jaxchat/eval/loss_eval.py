"""Bits per byte on the validation split (nanochat/loss_eval.py evaluate_bpb at 348fbb3) and greedy samples from
fixed prompts (the sampling block of scripts/base_train.py at 348fbb3)."""

import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxchat.runtime import faults

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


def make_bpb_step(graphdef) -> Callable:
    """Jitted (params, inputs, targets, token_bytes) -> (sum of nats over counted tokens, sum of bytes)."""

    def nats_and_bytes(params, inputs_BT, targets_BT, token_bytes_V):
        losses_BT = nnx.merge(graphdef, params)(inputs_BT, targets_BT, reduction="none")
        valid = targets_BT >= 0
        nbytes_BT = jnp.where(valid, token_bytes_V[jnp.where(valid, targets_BT, 0)], 0)
        return jnp.sum(losses_BT * (nbytes_BT > 0)), jnp.sum(nbytes_BT)

    return jax.jit(nats_and_bytes)


def evaluate_bpb(bpb_step: Callable, params, batches: Iterator, steps: int, token_bytes_V) -> float:
    """bpb = total nats / (ln 2 * total bytes) over `steps` batches; special tokens (0 bytes) are not counted."""
    total_nats, total_bytes = 0.0, 0
    for _ in range(steps):
        faults.check()  # a signal during training stops the evaluation here
        inputs, targets = next(batches)
        nats, nbytes = bpb_step(params, inputs, targets, token_bytes_V)
        total_nats += float(nats)
        total_bytes += int(nbytes)
    return total_nats / (math.log(2) * total_bytes) if total_bytes else math.inf


def greedy_generate(graphdef, params, prompts: list[list[int]], max_tokens: int, stop_ids: set[int],
                    bucket: int = 64) -> list[list[int]]:
    """Greedy continuation of each prompt with the KV-cache decoder (fixed shapes: one compilation for all).

    Parameters may be sharded over the devices of several processes: every process then runs this same loop, tokens
    go in as host values (replicated) and logits come back replicated, so each process reads them locally.
    """
    max_len = math.ceil((max(len(p) for p in prompts) + max_tokens) / bucket) * bucket
    model = nnx.merge(graphdef, params)
    sharding = jax.tree.leaves(params)[0].sharding
    out = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else sharding
    step = jax.jit(lambda params, token, pos, cache: nnx.merge(graphdef, params).decode_step(token, pos, cache),
                   out_shardings=out)
    new_cache = jax.jit(lambda: model.init_cache(1, max_len), out_shardings=out)
    outputs = []
    for prompt in prompts:
        faults.check()  # a signal during training stops the sampling here
        cache = new_cache()
        for pos, token in enumerate(prompt):  # prefill, one token at a time through the same compiled step
            logits, cache = step(params, np.array([token], np.int32), np.int32(pos), cache)
        generated = []
        for pos in range(len(prompt), len(prompt) + max_tokens):
            next_id = int(np.argmax(np.asarray(logits)[0]))
            if next_id in stop_ids:
                break
            generated.append(next_id)
            logits, cache = step(params, np.array([next_id], np.int32), np.int32(pos), cache)
        outputs.append(generated)
    return outputs
