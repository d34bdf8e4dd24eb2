"""The train step as a library: build the model and optimizer state sharded on the mesh, compile the step ahead of
time (with its memory prediction and `--device-batch-size=auto`); jaxchat.data.dataloader feeds it batches.

One jitted, donated step per optimizer step: `lax.scan` over the micro-batches (so the total batch is exactly
--total-batch-size for any --device-batch-size, as nanochat's scripts/base_train.py accumulates grad_accum_steps
micro-batches at 348fbb3), each device's gradients summed over them in a shard_map and reduced across the (data,
fsdp) mesh once (on TPU, where GSPMD places the reductions: Backend.per_device_gradients), then the Muon + AdamW
update with this step's schedule values passed in as traced scalars (never a recompile).

    graphdef, params, opt_state, train_step, targets = init_training(config, tx, mesh, seed=0, compute_dtype="float32")
    step_memory = plan_and_compile(train_step, targets, mesh, device_batch_size=memory.AUTO, total_batch_size=N, seq_len=T)
    inputs, targets = step_batch(loader, step_memory.grad_accum, meshlib.batch_sharding(mesh))
    params, opt_state, metrics = step_memory.compiled(params, opt_state, inputs, targets, optim.schedule_arrays(values))
"""


import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import GPT, GPTConfig, abstract_model
from jaxchat.model.remat import REMAT_AUTO
from jaxchat.training import memory
from jaxchat.training import optim

# ----------------------------------------------------------------------------------------------------------------
# Building the step and its state


def make_train_step(graphdef, tx, shardings: dict, per_device: bool = True):
    """The jitted step: (params, opt_state, inputs (A, rows, T), targets, schedule) -> (params, opt_state, metrics).

    metrics: "loss", the mean over all A micro-batches (the whole total batch, not only the last micro-batch), and
    "grad_norm", the global norm of the averaged gradient (checked for non-finite values on the host).
    per_device: each device's gradients summed in a shard_map and reduced once (gradient_sum), else GSPMD's
    placement of the reductions (gspmd_gradient_sum); Backend.per_device_gradients decides.
    """
    mesh = shardings["replicated"].mesh
    gradients = gradient_sum if per_device else gspmd_gradient_sum

    def train_step(params, opt_state, inputs_ART, targets_ART, schedule):
        # the mesh in context: fp8 scales are taken per data-parallel shard (jaxchat.model.mesh.data_shard_axes)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            grad_sum, loss = gradients(graphdef, params, shardings)(params, inputs_ART, targets_ART)
            grads = jax.tree.map(lambda g: g / inputs_ART.shape[0], grad_sum)  # the mean over micro-batches
            grads = jax.lax.with_sharding_constraint(grads, shardings["grads"])  # ZeRO-2: the optimizer's layout
            opt_state = optim.set_schedule(opt_state, schedule)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(train_step, donate_argnums=(0, 1),
                   out_shardings=(shardings["params"], shardings["opt_state"], shardings["replicated"]))


def gradient_sum(graphdef, params_like, shardings: dict):
    """(params, inputs (A, rows, T), targets) -> (the loss gradient summed over the A micro-batches, the mean loss).

    Each device runs its own rows' forward and backward passes in a shard_map, with whole weights (FSDP: gathered
    where each layer uses them, jaxchat.model.mesh.whole), and adds up its own gradient over the micro-batches; the
    devices' sums are reduced once, after the last micro-batch, onto the optimizer's ZeRO layout
    (mesh.gradient_reduction). Left to GSPMD, every layer's weight gradient was all-reduced in every micro-batch.

    A micro-batch's loss is the mean over the whole batch's tokens whose target is not -1 (nanochat's
    cross_entropy(ignore_index=-1)): each device's mean, weighted by its share of those tokens."""
    mesh = shardings["replicated"].mesh
    axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    leaves, tree = jax.tree.flatten(params_like)
    plans = [meshlib.gradient_reduction(x.shape, p.spec, g.spec, mesh) for x, p, g in
             zip(leaves, tree.flatten_up_to(shardings["params"]), tree.flatten_up_to(shardings["grads"]))]

    def per_device(params, inputs_ART, targets_ART):
        counts_A = jnp.sum(targets_ART >= 0, axis=(1, 2), dtype=jnp.float32)
        share_A = counts_A / jnp.maximum(jax.lax.psum(counts_A, axes) if axes else counts_A, 1.0)

        grad_sum, losses_A = _accumulate(graphdef, params, (inputs_ART, targets_ART, share_A))
        grad_sum = tree.unflatten([meshlib.reduce_gradient(g, steps)
                                   for g, (steps, _) in zip(tree.flatten_up_to(grad_sum), plans)])
        return grad_sum, (jax.lax.psum(losses_A, axes) if axes else losses_A).mean()

    batch = P(None, meshlib.DATA_AXES)
    return jax.shard_map(per_device, mesh=mesh, check_vma=False,
                         in_specs=(jax.tree.map(lambda s: s.spec, shardings["params"]), batch, batch),
                         out_specs=(tree.unflatten([spec for _, spec in plans]), P()))


def gspmd_gradient_sum(graphdef, params_like, shardings: dict):
    """gradient_sum's contract with GSPMD deciding where the gradients are reduced (the batch is split over the
    devices; the model's parameters are used whole as their shardings say)."""
    def run(params, inputs_ART, targets_ART):
        ones_A = jnp.ones(inputs_ART.shape[:1], jnp.float32)
        grad_sum, losses_A = _accumulate(graphdef, params, (inputs_ART, targets_ART, ones_A))
        return grad_sum, losses_A.mean()
    return run


def _accumulate(graphdef, params, batches):
    """`lax.scan` over the micro-batches (inputs, targets, weight): (the sum of the gradients of each micro-batch's
    mean loss times its weight, each micro-batch's weighted loss)."""
    def micro_step(grad_sum, batch):
        inputs_RT, targets_RT, weight = batch
        loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(inputs_RT, targets_RT) * weight)(params)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    return jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), batches)


def abstract_training(config: GPTConfig, tx, mesh, *, compute_dtype: str, **model_options):
    """(graphdef, train_step, (abstract params, abstract opt_state) with shardings): shapes only, nothing allocated.

    model_options: GPT's scan_layers, remat, loss_chunk, embed_dtype, fp8."""
    model = abstract_model(config, compute_dtype=compute_dtype, **model_options)
    graphdef, abstract_state = nnx.split(model)
    abstract_params = nnx.to_pure_dict(abstract_state)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    shardings = dict(params=meshlib.param_shardings(abstract_params, mesh),
                     opt_state=meshlib.optimizer_shardings(abstract_opt, mesh),
                     grads=meshlib.optimizer_shardings(abstract_params, mesh),
                     replicated=meshlib.replicated(mesh))
    targets = (meshlib.abstract_like(abstract_params, shardings["params"]),
               meshlib.abstract_like(abstract_opt, shardings["opt_state"]))
    return graphdef, make_train_step(graphdef, tx, shardings, model.backend.per_device_gradients), targets


def abstract_steps(config: GPTConfig, tx, mesh, *, remat: str, compute_dtype: str, **model_options):
    """({remat: graphdef}, {remat: train_step}, targets) for --remat: one policy, or for "auto" every policy of
    remat.REMAT_AUTO, cheapest first, for plan_and_compile to try (the parameters are the same for all)."""
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
