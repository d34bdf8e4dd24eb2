"""The train step as a library: build the model and optimizer state sharded on the mesh, compile the step ahead of
time (with its memory prediction and `--device-batch-size=auto`) and feed it batches.

One jitted, donated step per optimizer step: `lax.scan` over the micro-batches (so the total batch is exactly
--total-batch-size for any --device-batch-size, as nanochat's scripts/base_train.py accumulates grad_accum_steps
micro-batches at 348fbb3), gradient averaging by GSPMD over the (data, fsdp) mesh, then the Muon + AdamW update with
this step's schedule values passed in as traced scalars (never a recompile).

    graphdef, params, opt_state, train_step, targets = init_training(config, tx, mesh, seed=0, compute_dtype="float32")
    step_memory = plan_and_compile(train_step, targets, mesh, device_batch_size=memory.AUTO, total_batch_size=N, seq_len=T)
    inputs, targets = step_batch(loader, step_memory.grad_accum, meshlib.batch_sharding(mesh))
    params, opt_state, metrics = step_memory.compiled(params, opt_state, inputs, targets, optim.schedule_arrays(values))
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxchat import memory
from jaxchat import mesh as meshlib
from jaxchat import optim
from jaxchat.common import UserError, print0
from jaxchat.model import GPT, REMAT_AUTO, GPTConfig, abstract_model

# ----------------------------------------------------------------------------------------------------------------
# Building the step and its state


def make_train_step(graphdef, tx, shardings: dict):
    """The jitted step: (params, opt_state, inputs (A, rows, T), targets, schedule) -> (params, opt_state, metrics).

    metrics: "loss", the mean over all A micro-batches (the whole total batch, not only the last micro-batch), and
    "grad_norm", the global norm of the averaged gradient (checked for non-finite values on the host).
    """

    def train_step(params, opt_state, inputs_ART, targets_ART, schedule):
        # the mesh in context: fp8 scales are taken per data-parallel shard (jaxchat.mesh.data_shard_axes)
        with jax.sharding.use_abstract_mesh(shardings["replicated"].mesh.abstract_mesh):
            return update(params, opt_state, inputs_ART, targets_ART, schedule)

    def update(params, opt_state, inputs_ART, targets_ART, schedule):
        def micro_step(grad_sum, batch):
            inputs_RT, targets_RT = batch
            loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(inputs_RT, targets_RT))(params)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        grad_sum = jax.tree.map(jnp.zeros_like, params)
        grad_sum, losses = jax.lax.scan(micro_step, grad_sum, (inputs_ART, targets_ART))
        # Mean over micro-batches; the constraint makes the cross-device mean a reduce-scatter (ZeRO-2).
        grads = jax.tree.map(lambda g: g / inputs_ART.shape[0], grad_sum)
        grads = jax.lax.with_sharding_constraint(grads, shardings["grads"])
        opt_state = optim.set_schedule(opt_state, schedule)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": losses.mean(), "grad_norm": optax.tree.norm(grads)}

    return jax.jit(train_step, donate_argnums=(0, 1),
                   out_shardings=(shardings["params"], shardings["opt_state"], shardings["replicated"]))


def abstract_training(config: GPTConfig, tx, mesh, *, compute_dtype: str, **model_options):
    """(graphdef, train_step, (abstract params, abstract opt_state) with shardings): shapes only, nothing allocated.

    model_options: GPT's scan_layers, remat, loss_chunk, embed_dtype, fp8."""
    graphdef, abstract_state = nnx.split(abstract_model(config, compute_dtype=compute_dtype, **model_options))
    abstract_params = nnx.to_pure_dict(abstract_state)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    shardings = dict(params=meshlib.param_shardings(abstract_params, mesh),
                     opt_state=meshlib.optimizer_shardings(abstract_opt, mesh),
                     grads=meshlib.optimizer_shardings(abstract_params, mesh),
                     replicated=meshlib.replicated(mesh))
    targets = (meshlib.abstract_like(abstract_params, shardings["params"]),
               meshlib.abstract_like(abstract_opt, shardings["opt_state"]))
    return graphdef, make_train_step(graphdef, tx, shardings), targets


def abstract_steps(config: GPTConfig, tx, mesh, *, remat: str, compute_dtype: str, **model_options):
    """({remat: graphdef}, {remat: train_step}, targets) for --remat: one policy, or for "auto" every policy of
    model.REMAT_AUTO, cheapest first, for plan_and_compile to try (the parameters are the same for all)."""
    built = {r: abstract_training(config, tx, mesh, compute_dtype=compute_dtype, remat=r, **model_options)
             for r in (REMAT_AUTO if remat == "auto" else (remat,))}
    return ({r: b[0] for r, b in built.items()}, {r: b[1] for r, b in built.items()},
            next(iter(built.values()))[2])


def init_state(config: GPTConfig, tx, targets, *, seed: int, compute_dtype: str, **model_options):
    """(params, opt_state) created already sharded as the targets say (never a full copy on one device)."""
    make_params = lambda: nnx.to_pure_dict(nnx.split(  # noqa: E731
        GPT(config, rngs=nnx.Rngs(seed), compute_dtype=compute_dtype, **model_options))[1])
    params = jax.jit(make_params, out_shardings=jax.tree.map(lambda t: t.sharding, targets[0]))()
    opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda t: t.sharding, targets[1]))(params)
    return params, opt_state


def without_fp8(graphdef, params_like):
    """The graphdef of the same model with fp8 off: evaluation, CORE and samples run in bf16, as in nanochat."""
    model = nnx.merge(graphdef, params_like)
    model.set_fp8(False)
    return nnx.split(model)[0]


def init_training(config: GPTConfig, tx, mesh, *, seed: int, compute_dtype: str, **model_options):
    """(graphdef, params, opt_state, train_step, restore targets): parameters and optimizer state are created
    already sharded on the mesh (never a full copy on one device)."""
    graphdef, train_step, targets = abstract_training(config, tx, mesh, compute_dtype=compute_dtype, **model_options)
    params, opt_state = init_state(config, tx, targets, seed=seed, compute_dtype=compute_dtype, **model_options)
    return graphdef, params, opt_state, train_step, targets


# ----------------------------------------------------------------------------------------------------------------
# Compiling ahead of time


def step_input_specs(mesh, device_batch_size: int, grad_accum: int, seq_len: int,
                     schedule_keys=optim.SCHEDULE_KEYS):
    """Abstract (inputs, targets, schedule) of one train step: (accum, rows, T) int32 split over every device."""
    rows = device_batch_size * mesh.size
    tokens = jax.ShapeDtypeStruct((grad_accum, rows, seq_len), jnp.int32, sharding=meshlib.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=meshlib.replicated(mesh))
    return tokens, tokens, {k: scalar for k in schedule_keys}


def compile_step(train_step, params_like, opt_like, mesh, *, device_batch_size: int, grad_accum: int,
                 seq_len: int) -> jax.stages.Compiled:
    """The jitted step lowered and compiled for these shapes (ShapeDtypeStructs with shardings: nothing allocated)."""
    return train_step.lower(params_like, opt_like, *step_input_specs(mesh, device_batch_size, grad_accum,
                                                                     seq_len)).compile()


def plan_and_compile(train_step, targets, mesh, *, device_batch_size: int, total_batch_size: int, seq_len: int,
                     budget_gb: float = 0.0, capacity: tuple[int, str] | None = None, log=None) -> memory.StepMemory:
    """The step compiled ahead of time for the device batch (memory.AUTO: the largest that is predicted to fit).
    `train_step`: the jitted step, or {remat policy: step} to try in that order (abstract_steps; --remat=auto);
    `log`: memory.plan_step's.

    XLA's buffer assignment predicts the peak memory per device before the first step; the compiled executable is
    the one that trains, so this is the run's only compilation of the step."""
    steps = train_step if isinstance(train_step, dict) else {"": train_step}
    return memory.plan_step(
        lambda b, accum, variant: compile_step(steps[variant], *targets, mesh, device_batch_size=b, grad_accum=accum,
                                               seq_len=seq_len),
        device_batch_size=device_batch_size, total_batch_size=total_batch_size, seq_len=seq_len,
        data_parallel_size=mesh.size, budget_gb=budget_gb, capacity=capacity, variants=tuple(steps), log=log)


# ----------------------------------------------------------------------------------------------------------------
# Feeding


def prepare_data(data: str) -> tuple:
    """(tokenizer, {"train": files, "val": files}) of a data source; the demo corpus and its tokenizer are built on
    first use (by process 0, the others wait)."""
    from jaxchat import dataset, tokenizer

    tok_dir = tokenizer.default_dir(data)
    if data == "demo":
        dataset.build_demo_corpus()
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.pkl")) and jax.process_index() == 0:
            from jaxchat.tok_train import train_tokenizer
            train_tokenizer(source="demo", vocab_size=4096, max_chars=2_000_000_000, doc_cap=10_000, out_dir=tok_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("demo tokenizer ready")
    files = {split: dataset.list_shards(data, split) for split in ("train", "val")}
    dataset.check_shards(files["train"])  # footers: a bad file is one line naming it, before compiling
    dataset.check_shards(files["val"], full=True)  # every text: the final evaluation must not fail on it
    return tokenizer.Tokenizer.load(tok_dir), files


def check_resume_data(meta: dict, data: str, allow_change: bool, where: str) -> None:
    """Before compiling: a checkpoint's loader state against the train shards present now (dataloader.
    check_resume_shards: changed shards are one line, accepted ones print what the resume does)."""
    from jaxchat import dataset
    from jaxchat.dataloader import check_resume_shards

    state = (meta.get("dataloader_states") or [meta["dataloader_state_dict"]])[0]  # every rank's lists the same shards
    note = check_resume_shards(state, dataset.shard_identities(dataset.list_shards(data, "train")), allow_change, where)
    if note:
        print0(note)


def shard_layout(data_shards: int, device_batch_size: int) -> tuple[int, int, int]:
    """(data shards in all, shards of this process, this process's first shard) for --data-shards (0: one per
    process); each shard is one loader rank, like one of nanochat's DDP ranks."""
    shards = data_shards or jax.process_count()
    per_process = shards // jax.process_count()
    rows = device_batch_size * jax.local_device_count()
    if shards % jax.process_count() or rows % per_process:
        raise UserError(f"--data-shards={shards} must be a multiple of the {jax.process_count()} processes and split "
                        f"each process's {rows} rows evenly")
    return shards, per_process, jax.process_index() * per_process


def make_loaders(tok, files: list[str], *, device_batch_size: int, seq_len: int, data_shards: int) -> "ShardLoaders":
    """This process's loaders over `files` (fresh: a validation pass makes one per evaluation, from the start)."""
    from jaxchat.dataloader import DataLoader

    shards, per_process, first = shard_layout(data_shards, device_batch_size)
    rows = device_batch_size * jax.local_device_count() // per_process
    return ShardLoaders([DataLoader(tok, files, rows, seq_len, rank=first + j, world_size=shards)
                         for j in range(per_process)])


class ShardLoaders:
    """This process's data shards (consecutive loader ranks), their rows concatenated into one local batch.

    With one shard per process this is the plain per-process loader. Fixing --data-shards makes the global batch
    independent of the number of processes: 1 process reading shards 0 and 1 sees the same rows, in the same
    order, as 2 processes reading one each (the multi-process test relies on it; so can a resume on fewer hosts).
    """

    def __init__(self, loaders: list):
        self.loaders = loaders

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [next(loader) for loader in self.loaders]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def get_state(self) -> list[dict]:
        return [loader.get_state() for loader in self.loaders]

    def set_state(self, states: list[dict], allow_data_change: bool = False) -> None:
        for loader, state in zip(self.loaders, states, strict=True):
            loader.set_state(state, allow_data_change)

    @property
    def epoch(self) -> int:
        return min(loader.epoch for loader in self.loaders)


def global_batch(local_ART: np.ndarray, sharding) -> jax.Array:
    """This process's rows -> one global array sharded over every device of every process."""
    return jax.make_array_from_process_local_data(sharding, local_ART)


def step_batch(loader, grad_accum: int, sharding) -> tuple[jax.Array, jax.Array]:
    """One step's (inputs, targets): `grad_accum` micro-batches from the loader stacked (A, rows, T), on the devices."""
    micro = [next(loader) for _ in range(grad_accum)]
    return tuple(global_batch(np.stack([m[i] for m in micro]).astype(np.int32), sharding) for i in (0, 1))
