"""jaxchat.training.step on 8 host devices: accumulation, device count and FSDP do not change the result (one device:
tests/test_step.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import GPTConfig
from jaxchat.training import optim
from jaxchat.training import recipe
from jaxchat.training.config import optimizer_flags
from jaxchat.training.step import init_training

pytestmark = pytest.mark.slow

CONFIG = GPTConfig(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
ROWS, STEPS = 32, 2  # 32 rows x 16 tokens per step


def batches(ignored: bool = False):
    """STEPS steps of (inputs, targets); ignored: targets of -1 in most of the first eight rows (the first device's
    of 8), none elsewhere."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (STEPS, ROWS, CONFIG.sequence_len + 1)).astype(np.int32)
    inputs, targets = tokens[..., :-1], tokens[..., 1:].copy()
    if ignored:
        targets[:, :8, 3:] = -1
    return inputs, targets


def run(mesh, accum_steps: int, ignored: bool = False):
    """Losses and final parameters of STEPS steps, each step's rows split into `accum_steps` micro-batches."""
    tx = optim.make_optimizer(**optimizer_flags(), **recipe.get("348fbb3").optimizer_options(), model_dim=CONFIG.n_embd, weight_decay=0.2, muon_dtype=jnp.float32)
    _, params, opt_state, train_step, _ = init_training(CONFIG, tx, mesh, seed=0, compute_dtype="float32")
    # Perturb the init as the reference fixtures do: with zero projections the lambdas' gradients are pure rounding
    # noise (the output is scale-invariant in them) and Adam's first step would amplify that noise to +-lr.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    start = jax.tree.map(np.asarray, params)
    sharding = meshlib.batch_sharding(mesh)
    losses = []
    for step, (inputs, targets) in enumerate(zip(*batches(ignored))):
        micro = lambda a: jax.device_put(a.reshape(accum_steps, ROWS // accum_steps, -1), sharding)
        values = optim.schedule_values(step, num_iterations=10, warmup_ratio=0.0, warmdown_ratio=0.5,
                                       final_lr_frac=0.0, weight_decay=0.2)
        params, opt_state, metrics = train_step(params, opt_state, micro(inputs), micro(targets),
                                                optim.schedule_arrays(values))
        losses.append(float(metrics["loss"]))
    return np.array(losses), start, jax.tree.map(np.asarray, params)


def assert_same(run_a, run_b):
    """Same losses; every parameter within 1e-4 of the distance it moved (float32 reassociation only)."""
    (losses_a, start, params_a), (losses_b, _, params_b) = run_a, run_b
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5)
    moved = jax.tree.map(lambda a, b, s: np.linalg.norm(a - b) / np.linalg.norm(b - s), params_a, params_b, start)
    assert max(jax.tree.leaves(moved)) < 1e-4, moved


@pytest.fixture(scope="module")
def reference_run():
    return run(meshlib.make_mesh(fsdp=1), accum_steps=1)  # device batch 4 x 8 devices, 1 micro-batch


@pytest.mark.parametrize("accum_steps", [2, 4])  # device batch 2 x 2 micro-batches, 1 x 4
def test_accumulation_equals_one_big_batch(reference_run, accum_steps):
    assert_same(run(meshlib.make_mesh(fsdp=1), accum_steps), reference_run)


def test_eight_devices_equal_one(reference_run):
    assert_same(run(meshlib.make_mesh(fsdp=1, devices=jax.devices()[:1]), accum_steps=1), reference_run)


def test_ignored_targets_weigh_each_device_by_its_tokens():
    """Each device computes its own rows' mean loss; the step weighs it by the device's share of the batch's counted
    tokens, so the loss is the mean over every counted token (nanochat's ignore_index=-1), as on one device, even
    when one device's rows are mostly ignored (a mean of the devices' means would differ)."""
    one = run(meshlib.make_mesh(fsdp=1, devices=jax.devices()[:1]), accum_steps=2, ignored=True)
    assert_same(run(meshlib.make_mesh(fsdp=1), accum_steps=2, ignored=True), one)


def test_fsdp_equals_data_parallel(reference_run):
    assert_same(run(meshlib.make_mesh(fsdp=4), accum_steps=2), reference_run)  # 2 data x 4 fsdp


def test_loss_falls_and_step_compiles_once():
    mesh = meshlib.make_mesh(fsdp=2)
    tx = optim.make_optimizer(**optimizer_flags(), **recipe.get("348fbb3").optimizer_options(), model_dim=CONFIG.n_embd, weight_decay=0.2)
    _, params, opt_state, train_step, _ = init_training(CONFIG, tx, mesh, seed=0, compute_dtype="float32")
    inputs, targets = (jax.device_put(a[0][None], meshlib.batch_sharding(mesh)) for a in batches())
    losses = []
    for step in range(8):
        values = optim.schedule_values(step, num_iterations=8, warmup_ratio=0.0, warmdown_ratio=0.5,
                                       final_lr_frac=0.0, weight_decay=0.2)
        params, opt_state, metrics = train_step(params, opt_state, inputs, targets, optim.schedule_arrays(values))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 1.0  # memorising one batch
    assert train_step._cache_size() == 1
