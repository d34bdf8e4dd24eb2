"""jaxchat.eval.loss_eval's contract: bits per byte as nanochat/loss_eval.py evaluate_bpb defines it (348fbb3), jitted
and not, and greedy generation with the KV cache equal to the argmax of full forward passes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat.eval.loss_eval import evaluate_bpb, greedy_generate, make_bpb_step
from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import GPT, GPTConfig

pytestmark = pytest.mark.slow

CONFIG = GPTConfig(sequence_len=32, vocab_size=64, n_layer=3, n_head=2, n_kv_head=2, n_embd=32, window_pattern="SL")


def model():
    m = GPT(CONFIG, rngs=nnx.Rngs(0))
    state = nnx.state(m, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 32))  # zero-initialised projections would make every row alike
    nnx.update(m, jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape), state))
    graphdef, state = nnx.split(m)
    return graphdef, nnx.to_pure_dict(state)  # the training loop's form of the parameters


def test_bpb_counts_nats_over_bytes_of_real_tokens_only():
    graphdef, params = model()
    rng = np.random.default_rng(0)
    token_bytes = rng.integers(1, 5, CONFIG.vocab_size).astype(np.int32)
    token_bytes[:3] = 0  # special tokens: 0 bytes, not counted
    batches = [(rng.integers(0, CONFIG.vocab_size, (2, 16)).astype(np.int32),
                rng.integers(0, CONFIG.vocab_size, (2, 16)).astype(np.int32)) for _ in range(3)]
    batches[0][1][0, :4] = -1  # ignored targets
    per_token = jax.jit(lambda p, x, y: nnx.merge(graphdef, p)(x, y, reduction="none"))

    def expected(n: int) -> float:  # the definition, summed on the host over the first n batches
        nats = nbytes = 0.0
        for inputs, targets in batches[:n]:
            losses = np.asarray(per_token(params, inputs, targets))
            counted = np.where(targets >= 0, token_bytes[np.maximum(targets, 0)], 0)
            nats += float((losses * (counted > 0)).sum())
            nbytes += float(counted.sum())
        return nats / (math.log(2) * nbytes)

    bpb_step = make_bpb_step(graphdef)
    got = evaluate_bpb(bpb_step, params, iter(batches), 3, jnp.asarray(token_bytes))
    np.testing.assert_allclose(got, expected(3), rtol=1e-5)
    with jax.disable_jit():  # the same step op by op (one batch: slow without jit)
        np.testing.assert_allclose(evaluate_bpb(bpb_step, params, iter(batches), 1, jnp.asarray(token_bytes)),
                                   expected(1), rtol=1e-5)
    assert evaluate_bpb(bpb_step, params, iter(batches), 1, jnp.zeros_like(token_bytes)) == math.inf  # no bytes


def full_forward_greedy(forward, params, prompt, max_tokens, stop_ids):
    """The reference semantics: re-run the whole sequence and take the argmax of its last position (padded to one
    length, so one compilation serves every step: attention is causal, padding after a position cannot change it)."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        padded = np.zeros((1, CONFIG.sequence_len), np.int32)
        padded[0, : len(tokens)] = tokens
        next_id = int(np.argmax(np.asarray(forward(params, padded))[0, len(tokens) - 1]))
        if next_id in stop_ids:
            break
        tokens.append(next_id)
    return tokens[len(prompt):]


def test_greedy_generation_with_the_kv_cache_equals_full_forward_passes():
    graphdef, params = model()
    prompts = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]  # the last one
    # passes the sliding window (16 tokens for S layers at sequence_len 32)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    expected = [full_forward_greedy(forward, params, p, 8, set()) for p in prompts]
    assert greedy_generate(graphdef, params, prompts, 8, set(), bucket=16) == expected
    assert all(len(e) == 8 for e in expected)
    stop = expected[0][2]  # stopping at a token ends that prompt's continuation before it
    stopped = greedy_generate(graphdef, params, prompts[:1], 8, {stop}, bucket=16)[0]
    assert stopped == expected[0][: expected[0].index(stop)]


def test_greedy_generation_with_sharded_parameters():
    graphdef, params = model()
    mesh = meshlib.make_mesh(fsdp=8)
    sharded = jax.device_put(params, meshlib.param_shardings(params, mesh))
    assert sharded["wte"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # really split over the 8 devices
    assert greedy_generate(graphdef, sharded, [[5, 9, 2]], 6, set()) == \
        greedy_generate(graphdef, params, [[5, 9, 2]], 6, set())
