"""jaxchat.training.step's contract: abstract and real state agree, the compiled step is the jitted step is the eager
step, the device batch is decided (auto or checked) before anything trains, and batches reach the devices as given."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat.data.dataloader import ShardLoaders, global_batch, shard_layout, step_batch
from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import GPTConfig
from jaxchat.runtime.common import UserError
from jaxchat.training import memory
from jaxchat.training import optim
from jaxchat.training import recipe
from jaxchat.training.config import optimizer_flags
from jaxchat.training.step import abstract_training, init_training, plan_and_compile, step_input_specs

CONFIG = GPTConfig(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
SCHEDULE = optim.schedule_arrays(optim.schedule_values(3, num_iterations=10, warmup_ratio=0.0, warmdown_ratio=0.5,
                                                       final_lr_frac=0.0, weight_decay=0.2))


def optimizer(mesh):
    return optim.make_optimizer(**optimizer_flags(), **recipe.get("348fbb3").optimizer_options(), model_dim=CONFIG.n_embd, weight_decay=0.2, muon_dtype=jnp.float32,
                                muon_stack_sharding=meshlib.muon_stack_sharding(mesh))


def tokens(accum: int, rows: int, seed: int = 0):
    t = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (accum, rows, CONFIG.sequence_len + 1), np.int32)
    return t[..., :-1], t[..., 1:]


@pytest.fixture(scope="module")
def one_device():
    return meshlib.make_mesh(devices=jax.devices()[:1])


def test_abstract_state_matches_the_real_one_and_allocates_nothing():
    mesh = meshlib.make_mesh(fsdp=2)
    tx = optimizer(mesh)
    _, _, (params_like, opt_like) = abstract_training(CONFIG, tx, mesh, compute_dtype="float32")
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((params_like, opt_like)))
    _, params, opt_state, _, targets = init_training(CONFIG, tx, mesh, seed=0, compute_dtype="float32")
    for real, like in ((params, params_like), (opt_state, opt_like), (params, targets[0])):
        assert jax.tree.structure(real) == jax.tree.structure(like)
        for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(like)):
            assert (r.shape, r.dtype) == (a.shape, a.dtype) and r.sharding.is_equivalent_to(a.sharding, r.ndim)
    assert params_like["blocks"]["c_q"].sharding.spec == meshlib.param_shardings(params, mesh)["blocks"]["c_q"].spec


@pytest.mark.slow
def test_seed_changes_the_parameters_only(one_device):
    tx = optimizer(one_device)
    a = init_training(CONFIG, tx, one_device, seed=0, compute_dtype="float32")[1]
    b = init_training(CONFIG, tx, one_device, seed=1, compute_dtype="float32")[1]
    assert not np.array_equal(a["wte"], b["wte"]) and np.array_equal(a["resid_lambdas"], b["resid_lambdas"])


@pytest.mark.slow
def test_compiled_jitted_and_eager_steps_agree(one_device):
    """The ahead-of-time executable, the jitted function and the same function run op by op give one result."""
    tx = optimizer(one_device)
    graphdef, params, opt_state, train_step, targets = init_training(CONFIG, tx, one_device, seed=0,
                                                                     compute_dtype="float32")
    step_memory = plan_and_compile(train_step, targets, one_device, device_batch_size=2,
                                   total_batch_size=4 * CONFIG.sequence_len, seq_len=CONFIG.sequence_len)
    assert (step_memory.device_batch_size, step_memory.grad_accum) == (2, 2)
    inputs, labels = (jax.device_put(a, meshlib.batch_sharding(one_device)) for a in tokens(2, 2))
    # Perturbed like tests/test_step_devices.py: at init the lambdas' gradients are rounding noise that Adam amplifies.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the step donates its inputs)
    results = {"compiled": step_memory.compiled(copy(params), copy(opt_state), inputs, labels, SCHEDULE),
               "jit": train_step(copy(params), copy(opt_state), inputs, labels, SCHEDULE)}
    one = (inputs[:1], labels[:1])  # op by op is slow: one micro-batch, against the jitted step on the same one
    results["jit, one micro-batch"] = train_step(copy(params), copy(opt_state), *one, SCHEDULE)
    with jax.disable_jit():
        results["eager"] = train_step(copy(params), copy(opt_state), *one, SCHEDULE)
    # The loss is the mean over the micro-batches of the model's own loss.
    model = nnx.merge(graphdef, params)
    losses = [float(model(inputs[i], labels[i])) for i in range(2)]
    for name, (new_params, _, metrics) in results.items():
        single = name in ("eager", "jit, one micro-batch")
        np.testing.assert_allclose(float(metrics["loss"]), losses[0] if single else np.mean(losses), rtol=1e-5,
                                   err_msg=name)
        assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
        # The compiled and jitted steps are one executable; op by op, each parameter's update agrees to 1% of the
        # distance it moved (Muon's normalisations amplify the different float32 rounding of single ops).
        reference = results["jit, one micro-batch" if single else "jit"][0]
        tolerance = 1e-2 if name == "eager" else 1e-6
        for a, b, start in zip(*(jax.tree.leaves(t) for t in (new_params, reference, params))):
            a, b, start = np.asarray(a), np.asarray(b), np.asarray(start)
            assert np.linalg.norm(b - start) > 0, name  # the step moved every parameter
            assert np.linalg.norm(a - b) <= tolerance * np.linalg.norm(b - start), name


def test_input_specs_split_rows_over_every_device():
    mesh = meshlib.make_mesh(fsdp=2)
    inputs, labels, schedule = step_input_specs(mesh, device_batch_size=3, grad_accum=2, seq_len=16)
    assert inputs.shape == labels.shape == (2, 3 * 8, 16) and inputs.dtype == jnp.int32
    assert inputs.sharding == meshlib.batch_sharding(mesh)
    assert sorted(schedule) == sorted(optim.SCHEDULE_KEYS) and all(s.shape == () for s in schedule.values())


def test_device_batch_is_checked_before_compiling_and_auto_picks_the_largest(one_device):
    tx = optimizer(one_device)
    _, train_step, targets = abstract_training(CONFIG, tx, one_device, compute_dtype="float32")
    total = 8 * CONFIG.sequence_len  # 8 rows on one device
    with pytest.raises(UserError, match=r"use --device-batch-size in \[1, 2, 4, 8\]"):
        plan_and_compile(train_step, targets, one_device, device_batch_size=3, total_batch_size=total,
                         seq_len=CONFIG.sequence_len)
    auto = plan_and_compile(train_step, targets, one_device, device_batch_size=memory.AUTO, total_batch_size=total,
                            seq_len=CONFIG.sequence_len)
    assert (auto.device_batch_size, auto.grad_accum, list(auto.tried)) == (8, 1, [8])
    assert auto.predicted_bytes > 0 and auto.fits


class FakeLoader:
    """Numbered rows: batch k of loader r holds r * 1000 + k everywhere."""

    def __init__(self, rank: int, rows: int = 2, T: int = 4):
        self.rank, self.count, self.rows, self.T = rank, 0, rows, T

    def __next__(self):
        self.count += 1
        x = np.full((self.rows, self.T), self.rank * 1000 + self.count, np.int64)
        return x, x + 1

    def get_state(self):
        return {"count": self.count}

    def set_state(self, state, allow_data_change=False):
        self.count = state["count"]

    @property
    def epoch(self):
        return 1 + self.count // 10


def test_shard_loaders_concatenate_rows_and_keep_each_shards_position():
    loaders = ShardLoaders([FakeLoader(0), FakeLoader(1)])
    inputs, targets = next(loaders)
    assert inputs.shape == (4, 4) and list(inputs[:, 0]) == [1, 1, 1001, 1001]
    np.testing.assert_array_equal(targets, inputs + 1)
    for _ in range(10):
        next(loaders)
    assert loaders.get_state() == [{"count": 11}, {"count": 11}] and loaders.epoch == 2
    loaders.set_state([{"count": 3}, {"count": 5}])
    assert list(next(loaders)[0][:, 0]) == [4, 4, 1006, 1006]
    with pytest.raises(ValueError):
        loaders.set_state([{"count": 0}])  # one state per shard


def test_step_batch_stacks_micro_batches_on_the_devices():
    mesh = meshlib.make_mesh(fsdp=2)
    loader = FakeLoader(0, rows=8, T=4)  # 8 rows: one per device
    inputs, targets = step_batch(loader, 3, meshlib.batch_sharding(mesh))
    assert inputs.shape == (3, 8, 4) and inputs.dtype == jnp.int32 and inputs.sharding == meshlib.batch_sharding(mesh)
    assert list(np.asarray(inputs)[:, 0, 0]) == [1, 2, 3] and np.array_equal(np.asarray(targets), np.asarray(inputs) + 1)
    assert len(inputs.addressable_shards) == 8 and inputs.addressable_shards[0].data.shape == (3, 1, 4)
    rows = global_batch(np.arange(16, dtype=np.int32).reshape(8, 2), meshlib.row_sharding(mesh))
    np.testing.assert_array_equal(np.asarray(rows), np.arange(16).reshape(8, 2))


def test_shard_layout():
    rows = 2 * jax.local_device_count()  # device batch 2 on 8 host devices: 16 rows in this process
    assert shard_layout(0, 2) == (1, 1, 0)  # one shard per process
    assert shard_layout(4, 2) == (4, 4, 0)  # 4 ranks read by this one process, 4 rows each
    with pytest.raises(UserError, match=f"split each process's {rows} rows evenly"):
        shard_layout(3, 2)
