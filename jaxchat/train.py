"""Base-model pretraining: `python -m jaxchat.train` (nanochat's scripts/base_train.py flags, spec §11.1).

One jitted, donated train step per optimizer step: `lax.scan` over the micro-batches (so the total batch is exactly
--total-batch-size for any --device-batch-size), gradient averaging by GSPMD over the (data, fsdp) mesh, then the
Muon + AdamW update with this step's schedule values passed in as traced scalars (never a recompile).
"""

import contextlib
import dataclasses
import json
import os
import resource
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxchat import memory
from jaxchat import mesh as meshlib
from jaxchat import optim
from jaxchat import xla_flags
from jaxchat.checkpoint import Checkpointer, abstract_like, checkpoint_dir, input_changes
from jaxchat.common import UserError, base_dir, check_writable, print0, run_main
from jaxchat.config import parse_flags
from jaxchat.faults import SaveTimer, StopRequest
from jaxchat.evaluate import SAMPLE_PROMPTS, evaluate_bpb, greedy_generate, make_bpb_step
from jaxchat.model import GPT, GPTConfig
from jaxchat.monitor import Monitor, peak_flops, step_line
from jaxchat.plan import device_batch_warning, make_plan


def make_train_step(graphdef, tx, shardings: dict):
    """The jitted step: (params, opt_state, inputs (A, rows, T), targets, schedule) -> (params, opt_state, metrics).

    metrics: "loss", the mean over all A micro-batches (the whole total batch, not only the last micro-batch), and
    "grad_norm", the global norm of the averaged gradient (checked for non-finite values on the host).
    """

    def train_step(params, opt_state, inputs_ART, targets_ART, schedule):
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


def model_factory(config: GPTConfig, seed: int, compute_dtype: str, model_options: dict):
    """A function that builds the model (called under eval_shape for shapes, under jit for sharded parameters)."""
    return lambda: GPT(config, rngs=nnx.Rngs(seed), compute_dtype=compute_dtype, **model_options)


def abstract_training(config: GPTConfig, tx, mesh, *, seed: int = 0, compute_dtype: str, **model_options):
    """(graphdef, train_step, (abstract params, abstract opt_state) with shardings): shapes only, nothing allocated.

    model_options: GPT's remat, loss_chunk, embed_dtype."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(model_factory(config, seed, compute_dtype, model_options)))
    abstract_params = nnx.to_pure_dict(abstract_state)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    shardings = dict(params=meshlib.param_shardings(abstract_params, mesh),
                     opt_state=meshlib.optimizer_shardings(abstract_opt, mesh),
                     grads=meshlib.optimizer_shardings(abstract_params, mesh),
                     replicated=meshlib.replicated(mesh))
    targets = (abstract_like(abstract_params, shardings["params"]), abstract_like(abstract_opt, shardings["opt_state"]))
    return graphdef, make_train_step(graphdef, tx, shardings), targets


def init_training(config: GPTConfig, tx, mesh, *, seed: int, compute_dtype: str, **model_options):
    """(graphdef, params, opt_state, train_step, restore targets): parameters and optimizer state are created
    already sharded on the mesh (never a full copy on one device)."""
    graphdef, train_step, targets = abstract_training(config, tx, mesh, seed=seed, compute_dtype=compute_dtype,
                                                      **model_options)
    make_model = model_factory(config, seed, compute_dtype, model_options)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(make_model())[1]),
                     out_shardings=jax.tree.map(lambda t: t.sharding, targets[0]))()
    opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda t: t.sharding, targets[1]))(params)
    return graphdef, params, opt_state, train_step, targets


@dataclasses.dataclass
class LoopState:
    """What the loop carries between steps and across a resume (spec §9 loop_state)."""

    step: int = 0
    val_bpb: float | None = None
    min_val_bpb: float = float("inf")
    smooth_train_loss: float = 0.0
    total_training_time: float = 0.0


def prepare_data(c):
    """(tokenizer, train loader factory, val loader factory); the demo corpus and its tokenizer are built on first use."""
    from jaxchat import dataloader, dataset, tokenizer

    tok_dir = tokenizer.default_dir(c.data)
    if c.data == "demo":
        dataset.build_demo_corpus()
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.pkl")) and jax.process_index() == 0:
            from jaxchat.tok_train import train_tokenizer
            train_tokenizer(source="demo", vocab_size=4096, max_chars=2_000_000_000, doc_cap=10_000, out_dir=tok_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("demo tokenizer ready")
    train_files, val_files = dataset.list_shards(c.data, "train"), dataset.list_shards(c.data, "val")
    dataset.check_shards(train_files)  # footers: a bad file is one line naming it, before compiling
    dataset.check_shards(val_files, full=True)  # every text: the final evaluation must not fail on it
    tok = tokenizer.Tokenizer.load(tok_dir)
    rows = c.device_batch_size * jax.local_device_count()
    shards = c.data_shards or jax.process_count()
    per_process = shards // jax.process_count()
    if shards % jax.process_count() or rows % per_process:
        raise UserError(f"--data-shards={shards} must be a multiple of the {jax.process_count()} processes and split "
                        f"each process's {rows} rows evenly")
    first = jax.process_index() * per_process
    return (tok, lambda: ShardLoaders([dataloader.DataLoader(tok, train_files, rows // per_process, c.max_seq_len,
                                                             rank=first + j, world_size=shards)
                                       for j in range(per_process)]),
            lambda: ShardLoaders([dataloader.val_loader(tok, val_files, rows // per_process, c.max_seq_len,
                                                        rank=first + j, world_size=shards)
                                  for j in range(per_process)]))


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

    def set_state(self, states: list[dict]) -> None:
        for loader, state in zip(self.loaders, states, strict=True):
            loader.set_state(state)

    @property
    def epoch(self) -> int:
        return min(loader.epoch for loader in self.loaders)


@contextlib.contextmanager
def evaluation_guard(what: str, step: int, checkpointer: Checkpointer):
    """An evaluation that fails is one line; the save in flight (the final one, saved before evaluating) commits."""
    try:
        yield
    except Exception as e:
        last = checkpointer.last_complete()
        checkpointer.close()
        detail = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        where = (f"checkpoints are intact in {checkpointer.directory} (last complete: step {last}); fix it and resume "
                 f"with --resume-from-step=last") if last is not None else "no checkpoint was saved yet"
        raise UserError(f"step {step}: {what} failed ({detail[:300]}); {where}") from None


def resume_point(c, checkpointer: Checkpointer, model_tag: str, model_config: dict, inputs: dict) -> int | None:
    """The checkpoint step to resume from (None: start at 0), checked against this run before anything compiles."""
    resume = str(c.resume_from_step)
    if resume == "last" and not checkpointer.steps():
        print0(f"No checkpoint in {checkpointer.directory} yet: starting from step 0")
        resume = "-1"
    if resume == "-1":
        return None
    step = checkpointer.resolve_step(resume)
    meta = checkpointer.read_meta(step)
    saved_model = meta["model_config"]
    if saved_model != model_config:  # before restoring: shapes would not fit
        differ = {k: (v, saved_model.get(k)) for k, v in model_config.items() if saved_model.get(k) != v}
        raise UserError(f"checkpoint step {step} of {model_tag} was saved with another model "
                        f"({', '.join(f'{k}: saved {b}, now {a}' for k, (a, b) in differ.items())}; vocab_size comes "
                        f"from the tokenizer): use the flags and tokenizer of the saving run")
    changes = input_changes(meta.get("inputs", {}), inputs)
    if c.allow_batch_size_change:
        changes.pop("total_batch_size", None)
    if changes:
        hint = (" (or accept the new --total-batch-size knowingly with --allow-batch-size-change=true)"
                if "total_batch_size" in changes else "")
        raise UserError(f"checkpoint step {step} of {model_tag} was trained with other inputs ("
                        + ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in changes.items())
                        + f"): resume with the saving run's inputs, or train a new --model-tag{hint}")
    shards = c.data_shards or jax.process_count()
    saved_shards = len(meta.get("dataloader_states") or [meta["dataloader_state_dict"]])
    if saved_shards != shards:
        raise UserError(f"checkpoint step {step} was saved with {saved_shards} data shard(s), this run reads "
                        f"{shards}: resume with --data-shards={saved_shards} (a multiple of the process count)")
    return step


def stop_on_non_finite(step: int, loss: float, grad_norm: float, checkpointer: Checkpointer) -> None:
    """Stop before anything poisoned is saved, naming the last good checkpoint."""
    what = "loss" if not np.isfinite(loss) else "gradient norm"
    last = checkpointer.last_complete()
    checkpointer.close()
    where = (f"the last good checkpoint is step {last} in {checkpointer.directory}: resume with "
             f"--resume-from-step={last} and lower learning rates") if last is not None else "no checkpoint was saved yet"
    raise UserError(f"step {step}: non-finite {what} (loss {loss}, gradient norm {grad_norm}); stopped without "
                    f"saving; {where}")


def gather_json(obj) -> list:
    """Every process's JSON-able object, in process order (a list of one without multi-process)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([data.size]))))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row).rstrip(b"\0")) for row in gathered]


def global_batch(local_ART: np.ndarray, sharding) -> jax.Array:
    """This process's rows -> one global array sharded over every device of every process."""
    return jax.make_array_from_process_local_data(sharding, local_ART)


def step_batch(loader, grad_accum: int, sharding) -> tuple[jax.Array, jax.Array]:
    """One step's (inputs, targets): `grad_accum` micro-batches from the loader stacked (A, rows, T), on the devices."""
    micro = [next(loader) for _ in range(grad_accum)]
    return tuple(global_batch(np.stack([m[i] for m in micro]).astype(np.int32), sharding) for i in (0, 1))


def default_dtype(flag: str | None) -> str:
    """A dtype flag's value, else the backend's default: bfloat16 on GPU (the reference on CUDA), float32 elsewhere."""
    return flag or ("bfloat16" if jax.default_backend() == "gpu" else "float32")


def train(argv: list[str]) -> dict:
    """Run training; returns {"losses": {step: loss}, "loop": LoopState} for tests and scripts."""
    c = parse_flags(argv)
    stop_request = StopRequest()  # from here on a signal ends the run cleanly (130 / 143, at most one line)
    try:
        return _train(c, stop_request)
    finally:
        stop_request.restore_handlers()
        for release in stop_request.on_exit:  # the checkpoint lock, also when the run fails
            release()


def _train(c, stop_request: StopRequest) -> dict:
    meshlib.init_distributed(c.coordinator_address or None, c.num_processes or None,
                             c.process_id if c.process_id >= 0 else None, init_timeout=c.init_timeout,
                             peer_timeout=c.peer_timeout)
    mesh = meshlib.make_mesh(c.fsdp)
    compute_dtype, muon_dtype = default_dtype(c.compute_dtype), default_dtype(c.muon_dtype)
    model_tag = c.model_tag or f"d{c.depth}"
    device_kind = jax.devices()[0].device_kind
    print0(f"Devices: {jax.device_count()} x {device_kind} over {jax.process_count()} process(es); "
           f"mesh {dict(mesh.shape)}; peak bf16 FLOP/s per device {peak_flops(device_kind):.3g}; compute {compute_dtype}, "
           f"Muon orthogonalisation {muon_dtype}")

    check_writable(base_dir(), "base directory")  # data, tokenizer, logs: before anything is built or compiled
    tok, train_loader_factory, val_loader_factory = prepare_data(c)
    plan = make_plan(depth=c.depth, aspect_ratio=c.aspect_ratio, head_dim=c.head_dim, max_seq_len=c.max_seq_len,
                     vocab_size=tok.vocab_size, window_pattern=c.window_pattern, num_iterations_flag=c.num_iterations,
                     target_flops=c.target_flops, target_param_data_ratio=c.target_param_data_ratio,
                     total_batch_size=c.total_batch_size, device_batch_size=c.device_batch_size or 1,
                     data_parallel_size=jax.device_count())  # device batch 0 (auto) is chosen after compiling
    core_bundle = None
    if c.core_metric_every > 0:
        from jaxchat import core_eval
        core_bundle = core_eval.find_bundle(download=False)  # fails now, with the download command, not hours in
        core_eval.check_bundle(core_bundle)  # every task file: a broken one fails now, not at the first CORE step

    # The checkpoint directory (locked: one run writes it) and the step to resume from, checked before compiling.
    config = plan.model
    checkpointer = Checkpointer(checkpoint_dir(model_tag), lock=True, keep_last=c.keep_last)
    stop_request.on_exit.append(checkpointer.release)
    # What the run depends on beyond the model's shape: a resume that changes any of it is refused.
    run_inputs = dict(tokenizer=tok.fingerprint(), data=c.data, total_batch_size=c.total_batch_size,
                      max_seq_len=c.max_seq_len, **({"recipe": c.recipe} if "recipe" in c else {}))
    resume_step = resume_point(c, checkpointer, model_tag, dataclasses.asdict(config), run_inputs)

    # Model and optimizer state, created directly with their shardings (no full copy on one device).
    wd_scaled = optim.depth_scaled_weight_decay(c.weight_decay, c.depth)
    bls = optim.batch_lr_scale(c.total_batch_size)
    tx = optim.make_optimizer(model_dim=config.n_embd, embedding_lr=c.embedding_lr, unembedding_lr=c.unembedding_lr,
                              matrix_lr=c.matrix_lr, scalar_lr=c.scalar_lr, adam_betas=(c.adam_beta1, c.adam_beta2),
                              weight_decay=wd_scaled, batch_lr_scale=bls, muon_dtype=jnp.dtype(muon_dtype),
                              muon_stack_sharding=meshlib.muon_stack_sharding(mesh))
    print0(f"Batch LR scale {bls:.6f}; Muon weight decay {c.weight_decay} x (12/{c.depth})^2 = {wd_scaled:.6f}; "
           f"AdamW LR scale (n/768)^-0.5 = {(config.n_embd / 768) ** -0.5:.6f}")
    graphdef, params, opt_state, train_step, restore_targets = init_training(
        config, tx, mesh, seed=c.seed, compute_dtype=compute_dtype, remat=c.remat, loss_chunk=c.loss_chunk,
        embed_dtype=c.embed_dtype)

    # Compile the step ahead of time: XLA's buffer assignment predicts the peak memory per device before the first
    # step (and --device-batch-size=auto tries powers of two until one fits). The compiled executable is the one that
    # trains, so this is the run's only compilation of the step.
    step_memory = memory.plan_step(
        lambda b, accum: memory.compile_step(train_step, *restore_targets, mesh, device_batch_size=b, grad_accum=accum,
                                             seq_len=c.max_seq_len),
        device_batch_size=c.device_batch_size, total_batch_size=c.total_batch_size, seq_len=c.max_seq_len,
        data_parallel_size=jax.device_count(), budget_gb=c.memory_budget_gb)
    train_step = step_memory.compiled
    if c.device_batch_size == memory.AUTO:
        c.device_batch_size = step_memory.device_batch_size
        plan = dataclasses.replace(plan, device_batch_size=c.device_batch_size, grad_accum_steps=step_memory.grad_accum)
        tok, train_loader_factory, val_loader_factory = prepare_data(c)  # loaders for the chosen batch
        print0(f"--device-batch-size=auto: {c.device_batch_size} ({step_memory.grad_accum} accumulation steps for "
               f"the total batch of {c.total_batch_size:,} tokens); predicted " + ", ".join(
                   f"{b}: {memory.fmt_bytes(n)}" for b, n in step_memory.tried.items()))
    print0(step_memory.summary())
    if warning := memory.over_capacity_warning(step_memory):
        print0(warning)
    if warning := device_batch_warning(c.device_batch_size):
        print0(warning)
    for line in plan.summary():
        print0(line)

    loop = LoopState()
    train_loader = train_loader_factory()
    if resume_step is not None:
        params, opt_state, meta = checkpointer.restore(resume_step, *restore_targets)
        states = meta.get("dataloader_states") or [meta["dataloader_state_dict"]]  # one per data shard
        per_process = len(states) // jax.process_count()
        train_loader.set_state(states[jax.process_index() * per_process:][:per_process])
        loop = LoopState(step=resume_step, val_bpb=meta["val_bpb"], **meta["loop_state"])
        print0(f"Resumed from step {resume_step} of {checkpointer.directory}")
    resume_step = loop.step
    # A rollback (or a fresh start over old checkpoints): newer steps would collide with this run's saves.
    if aside := checkpointer.move_aside_after(resume_step):
        print0(f"Checkpoints newer than step {resume_step} moved aside to {aside} (move them back to undo)")

    batch_sh, row_sh = meshlib.batch_sharding(mesh), meshlib.row_sharding(mesh)
    bpb_step = make_bpb_step(graphdef)
    token_bytes = jnp.asarray(tok.get_token_bytes())
    eval_steps = max(1, c.eval_tokens // (c.device_batch_size * c.max_seq_len * jax.device_count()))
    monitor = Monitor(c.run, c.to_dict(), os.path.join(base_dir(), "tensorboard", model_tag) if c.tensorboard else None,
                      wandb_dir=base_dir())
    N = plan.num_iterations
    flops_per_step = plan.flops_per_token * c.total_batch_size
    peak = peak_flops(device_kind) * jax.device_count()

    last_saved = None

    def save(step: int, kind: str) -> None:
        nonlocal last_saved
        # Every data shard's own position, in rank order, for exact resume.
        loader_states = [state for states in gather_json(consumed_loader_state) for state in states]
        # Steps asked for with --save-every are kept, whatever else (a timer, a signal) also saves there.
        kind = "step" if kind != "final" and c.save_every > 0 and step % c.save_every == 0 else kind
        meta = dict(step=step, val_bpb=loop.val_bpb, model_config=dataclasses.asdict(config), user_config=c.to_dict(),
                    inputs=run_inputs,
                    device_batch_size=c.device_batch_size, max_seq_len=c.max_seq_len,
                    total_batch_size=c.total_batch_size, dataloader_state_dict=loader_states[0],
                    dataloader_states=loader_states,
                    loop_state=dict(min_val_bpb=loop.min_val_bpb, smooth_train_loss=loop.smooth_train_loss,
                                    total_training_time=loop.total_training_time), kind=kind)
        checkpointer.save(step, params, opt_state, meta)  # "Saved checkpoint" is printed once it is committed
        save_timer.reset()
        last_saved = step

    def next_batch() -> tuple[tuple[jax.Array, jax.Array], list[dict]]:
        """One step's (inputs, targets) on the devices, and the loader state once they are consumed."""
        return step_batch(train_loader, plan.grad_accum_steps, batch_sh), train_loader.get_state()

    def to_device(rows):
        return tuple(global_batch(np.asarray(a, np.int32), row_sh) for a in rows)

    losses = {}
    # The next step's batch is read while this step runs on the devices (dispatch is asynchronous), so a checkpoint
    # records the loader state of the batches trained on, not of the one read ahead.
    consumed_loader_state, next_step_batch = train_loader.get_state(), None
    save_timer = SaveTimer(c.save_every_minutes)
    stop_request.training = True  # signals now stop at a step boundary with a save
    step = loop.step
    while True:
        last = step == N
        # Save before evaluating: an evaluation that fails (a val shard gone, a broken task file) loses nothing.
        if step not in (resume_step, last_saved) and (last or (c.save_every > 0 and step % c.save_every == 0)):
            save(step, kind="final" if last else "step")
        if last or (c.eval_every > 0 and step % c.eval_every == 0):
            with evaluation_guard("validation", step, checkpointer):
                val_batches = (to_device(b) for b in val_loader_factory())
                loop.val_bpb = evaluate_bpb(bpb_step, params, val_batches, eval_steps, token_bytes)
            loop.min_val_bpb = min(loop.min_val_bpb, loop.val_bpb)
            print0(f"Step {step:05d} | Validation bpb: {loop.val_bpb:.6f}")
            monitor.log({"step": step, "total_training_flops": flops_per_step * step,
                         "total_training_time": loop.total_training_time, "val/bpb": loop.val_bpb}, step)
        if core_bundle and (last or (step > 0 and step % c.core_metric_every == 0)):
            with evaluation_guard("the CORE evaluation", step, checkpointer):
                results = core_eval.evaluate_core(nnx.merge(graphdef, params), tok, bundle_dir=core_bundle,
                                                  max_per_task=c.core_metric_max_per_task)
            print0(f"Step {step:05d} | CORE metric: {results['core']:.4f}")
            monitor.log({"step": step, "total_training_flops": flops_per_step * step, "core_metric": results["core"],
                         "centered_results": {k: v["centered"] for k, v in results["tasks"].items()}}, step)
        if c.sample_every > 0 and (last or (step > 0 and step % c.sample_every == 0)):
            with evaluation_guard("sampling", step, checkpointer):
                prompts = [tok.encode(p, prepend_bos=True) for p in SAMPLE_PROMPTS]
                for prompt, out in zip(prompts, greedy_generate(graphdef, params, prompts, 16, {tok.bos_id})):
                    print0(tok.decode(prompt + out))
        if last:
            break

        if os.environ.get("JAXCHAT_TEST_DIE_AT_STEP") == str(step):  # test hook: a sudden death (OOM killer, node loss)
            checkpointer.wait()  # so the test knows which checkpoint must survive
            os.kill(os.getpid(), signal.SIGKILL)
        (inputs, targets), loader_state = next_step_batch or next_batch()
        values = optim.schedule_values(step, num_iterations=N, warmup_ratio=c.warmup_ratio,
                                       warmdown_ratio=c.warmdown_ratio, final_lr_frac=c.final_lr_frac,
                                       weight_decay=wd_scaled)
        schedule = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
        t0 = time.perf_counter()
        try:
            params, opt_state, metrics = train_step(params, opt_state, inputs, targets, schedule)
            next_step_batch = next_batch() if step + 1 < N else None  # host work while the step runs
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])  # waits for the step
        except Exception as e:
            if not memory.is_oom(e):
                raise
            # A save in flight finishes; nothing new is saved (the donated state is gone).
            raise UserError(memory.oom_message(step_memory, step, checkpointer.last_complete())) from None
        dt = time.perf_counter() - t0
        consumed_loader_state = loader_state
        losses[step] = loss
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            stop_on_non_finite(step, loss, grad_norm, checkpointer)
        loop.smooth_train_loss = 0.9 * loop.smooth_train_loss + 0.1 * loss
        debiased = loop.smooth_train_loss / (1 - 0.9 ** (step + 1))
        if step > 10:
            loop.total_training_time += dt
        mfu = 100 * flops_per_step / dt / peak
        eta = (N - step) * loop.total_training_time / (step - 10) if step > 10 else None
        if step % c.log_every == 0:
            print0(step_line(step, N, debiased, values["lrm"], dt, int(c.total_batch_size / dt), mfu,
                             train_loader.epoch, loop.total_training_time, eta))
        if step % 100 == 0:
            monitor.log({"step": step, "total_training_flops": flops_per_step * step,
                         "total_training_time": loop.total_training_time, "train/loss": debiased,
                         "train/lrm": values["lrm"], "train/dt": dt, "train/tok_per_sec": c.total_batch_size / dt,
                         "train/mfu": mfu, "train/epoch": train_loader.epoch}, step)
        step += 1
        loop.step = step
        stop = stop_request.requested()
        if step < N and (stop or save_timer.due()):
            save(step, kind="preempt" if stop else "time")
        checkpointer.poll()  # "Saved checkpoint" for a save that committed in the background
        if stop and step < N:
            checkpointer.close()
            print0(f"Stopped by {signal.Signals(stop_request.signum or signal.SIGTERM).name} after step {step - 1}: "
                   f"checkpoint {step} saved in {checkpointer.directory}; continue with --resume-from-step=last")
            sys.exit(stop_request.exit_code)

    checkpointer.close()
    monitor.close()
    if stop_request.signum is not None:  # a signal during the final evaluation or save: all is saved, say so
        print0(f"Stopped by {signal.Signals(stop_request.signum).name} at the end: the final checkpoint {step} is saved "
               f"in {checkpointer.directory}")
        sys.exit(stop_request.exit_code)
    stats = jax.local_devices()[0].memory_stats()  # jax.devices()[0] belongs to process 0
    peak_mib = stats["peak_bytes_in_use"] / 2**20 if stats else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print0(f"Peak memory usage: {peak_mib:.2f}MiB" + ("" if stats else " (host process; no device statistics)"))
    print0(f"Total training time: {loop.total_training_time / 60:.2f}m")
    print0(f"Minimum validation bpb: {loop.min_val_bpb:.6f}")
    return {"losses": losses, "loop": loop}


def main() -> None:
    xla_flags.apply()  # before the backend starts
    run_main(train, sys.argv[1:])


if __name__ == "__main__":
    main()
