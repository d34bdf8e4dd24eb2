"""Base-model pretraining: `python -m jaxchat.train`, nanochat's scripts/base_train.py (348fbb3) with its flags.

This module is the command line and the loop; the step is built from the flags and compiled in jaxchat/training/build.py
(the path jaxchat.aot shares), the step itself lives in jaxchat/training/step.py, the process is set up by
jaxchat/runtime/cli.py (SETUP). `train_with()` runs the phases in order: `set_up` (the devices, data, the checkpoint to
resume, the step compiled for the device batch, model and optimizer state, the plan), `restore_or_start` (a checkpoint,
or step 0), `run_loop` (evaluation at chosen steps in `evaluate_at_step`, one optimizer step at a time in
`train_one_step`, saves) and `finish`.
"""

import contextlib
import dataclasses
import functools
import os
import resource
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from jaxchat.data.dataloader import (ShardLoaders, check_resume_data, global_batch, make_loaders, prepare_data,
                                saved_states, shard_layout, step_batch)
from jaxchat.data.tokenizer import check_recorded
from jaxchat.eval.loss_eval import SAMPLE_PROMPTS, evaluate_bpb, greedy_generate, make_bpb_step
from jaxchat.interop import nanochat_ckpt
from jaxchat.model import fp8
from jaxchat.model import mesh as meshlib
from jaxchat.runtime import cli
from jaxchat.runtime.checkpoint import Checkpointer, checkpoint_dir, input_changes, recorded_tokenizer
from jaxchat.runtime.common import UserError, base_dir, check_writable, fmt_bytes, print0
from jaxchat.runtime.distributed import gather_json
from jaxchat.runtime.faults import SaveTimer, Stopped, StopRequest
from jaxchat.runtime.monitor import Monitor, step_line
from jaxchat.runtime.targets import peak_flops
from jaxchat.training import build, memory
from jaxchat.training import optim
from jaxchat.training import recipe as recipes
from jaxchat.training.config import parse_flags
from jaxchat.training.plan import Plan, device_batch_warning
from jaxchat.training.step import without_fp8


def model_tag(c: ConfigDict) -> str:
    """The checkpoint (and TensorBoard) directory name: --model-tag, else d<depth> as in nanochat."""
    return c.model_tag or f"d{c.depth}"


@dataclasses.dataclass
class LoopState:
    """What the loop carries between steps and across a resume (nanochat's scripts/base_train.py loop_state)."""

    step: int = 0
    val_bpb: float | None = None
    min_val_bpb: float = float("inf")
    smooth_train_loss: float = 0.0
    total_training_time: float = 0.0


@dataclasses.dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from, as its meta record says: read once, checked against this run before
    anything compiles (resume_point), restored after."""

    step: int
    loader_states: list  # every data shard's loader state, in shard order (dataloader.saved_states)
    loop: LoopState


@dataclasses.dataclass(kw_only=True)
class Run:
    """What set-up decides once: the flags, the mesh, the plan (with the device batch), the data, the compiled step."""

    c: ConfigDict
    mesh: Any
    plan: Plan
    tok: Any
    files: dict[str, list[str]]
    graphdef: Any  # the model of evaluation, CORE and samples: never fp8 (nanochat evaluates in bf16)
    train_step: Any  # the compiled step of step_memory (memory.StepMemory.compiled)
    step_memory: memory.StepMemory
    targets: tuple  # abstract (params, opt_state) with shardings: the restore targets
    wd_scaled: float
    core_bundle: str | None
    device_kind: str
    checkpointer: Checkpointer  # locked: one run writes the directory
    resume: Resume | None  # the checkpoint to restore (checked against this run in resume_point); None: a fresh start
    run_inputs: dict  # what the run depends on beyond the model's shape, saved and compared on resume
    init_from: nanochat_ckpt.Source | None = None  # --init-from's files (read, checked against this run): a fresh start

    def __post_init__(self):
        self.recipe = recipes.get(self.c.recipe)
        self.bpb_step = make_bpb_step(self.graphdef)
        self.token_bytes = jnp.asarray(self.tok.get_token_bytes(raw=self.recipe.raw_token_bytes))
        self.batch_sharding, self.row_sharding = meshlib.batch_sharding(self.mesh), meshlib.row_sharding(self.mesh)

    @property
    def model_tag(self) -> str:
        return model_tag(self.c)

    @property
    def user_config(self) -> dict:
        """The flags as logged and saved, with the device batch that ran (auto resolved)."""
        return dict(self.c.to_dict(), device_batch_size=self.plan.device_batch_size)

    @property
    def eval_steps(self) -> int:
        return max(1, self.c.eval_tokens // (self.plan.device_batch_size * self.c.max_seq_len * jax.device_count()))

    def loader(self, split: str) -> ShardLoaders:
        """A fresh loader of this process's shards of a split, for the run's device batch."""
        return make_loaders(self.tok, self.files[split], device_batch_size=self.plan.device_batch_size,
                            seq_len=self.c.max_seq_len, data_shards=self.c.data_shards)


@dataclasses.dataclass
class TrainState:
    """What the loop changes: model and optimizer state, the loop counters, the data position, timers, logging."""

    params: Any
    opt_state: Any
    loop: LoopState
    loader: ShardLoaders
    monitor: Monitor
    save_timer: SaveTimer
    resume_step: int | None  # the step resumed from (its checkpoint exists); None for a fresh start
    consumed: list  # the loader state once the batches trained on are consumed: what a checkpoint records
    last_saved: int | None = None


# ----------------------------------------------------------------------------------------------------------------
# Set-up


def set_up(c: ConfigDict, stop_request: StopRequest) -> tuple[Run, Any, Any]:
    """(run, params, opt_state): the devices, data, the checkpoint to resume (checked before compiling), the step
    compiled for the device batch (jaxchat.training.build: auto decided here, before the plan and the loaders exist),
    model and optimizer state (sharded), the plan."""
    mesh = meshlib.make_mesh(c.fsdp)
    run_backend = build.backend_for(c, mesh)  # decided once: dtype, attention, loss, fp8
    device_kind = jax.devices()[0].device_kind
    print0(f"Devices: {jax.device_count()} x {device_kind} over {jax.process_count()} process(es); "
           f"mesh {dict(mesh.shape)}; peak bf16 FLOP/s per device {peak_flops(device_kind):.3g}; compute "
           f"{run_backend.compute_dtype}, Muon orthogonalisation {run_backend.default_dtype(c.muon_dtype)}")
    if run_backend.note:
        print0(run_backend.note)
    if run_backend.fp8 and (note := fp8.no_speedup_note(run_backend)):
        print0(note)
    check_writable(base_dir(), "base directory")  # data, tokenizer, logs: before anything is built or compiled
    tok, files = prepare_data(c.data)
    core_bundle = find_core_bundle(c)
    plan = build.run_plan(c, tok.vocab_size, device_batch_size=c.device_batch_size or 1)  # the batch, the transfer
    checkpointer, resume, run_inputs = open_checkpoints(c, stop_request, tok, plan)
    # --init-from: a nanochat checkpoint's weights for a run that starts at step 0 (a resume continues instead).
    init_from = (nanochat_ckpt.check_source(c.init_from, plan.model, c.resume_optimizer, tok)  # every file read now
                 if c.init_from and resume is None else None)
    compiled = build.compile_train_step(c, plan, mesh, run_backend)
    params, opt_state = compiled.initial_state(c.seed)
    plan = build.run_plan(c, tok.vocab_size, device_batch_size=compiled.memory.device_batch_size)
    report_plan(c, compiled.memory, plan)
    graphdef = without_fp8(compiled.graphdef, compiled.targets[0]) if run_backend.fp8 else compiled.graphdef
    run = Run(c=c, mesh=mesh, plan=plan, tok=tok, files=files, graphdef=graphdef, train_step=compiled.memory.compiled,
              step_memory=compiled.memory, targets=compiled.targets, wd_scaled=compiled.wd_scaled,
              core_bundle=core_bundle, device_kind=device_kind, checkpointer=checkpointer, resume=resume,
              run_inputs=run_inputs, init_from=init_from)
    return run, params, opt_state


def dry_run(c: ConfigDict) -> dict:
    """--dry-run: the plan printed, nothing read, built or compiled (the vocabulary from the tokenizer if trained)."""
    vocab_size, source = build.planned_vocab(c)
    print0(f"--dry-run: vocabulary {vocab_size:,} ({source})")
    plan = build.run_plan(c, vocab_size, device_batch_size=c.device_batch_size or 1)
    print0("\n".join(plan.summary()))
    return {"losses": {}, "loop": LoopState(), "plan": plan}


def find_core_bundle(c: ConfigDict) -> str | None:
    """The CORE bundle when --core-metric-every asks for CORE: a missing or broken one fails now, not hours in."""
    if c.core_metric_every <= 0:
        return None
    from jaxchat.eval import core_eval
    from jaxchat.eval.core_bundle import find_bundle
    bundle = find_bundle(download=False)  # the error names the download command
    core_eval.check_bundle(bundle, c.core_metric_max_per_task, "--core-metric-max-per-task")  # every task file
    return bundle


def open_checkpoints(c: ConfigDict, stop_request: StopRequest, tok,
                     plan: Plan) -> tuple[Checkpointer, Resume | None, dict]:
    """(checkpointer, the checkpoint to resume or None, run inputs): the directory locked for this run (released on
    any exit) and the resume checked against this run and its horizon, before anything compiles."""
    checkpointer = Checkpointer(checkpoint_dir(model_tag(c)), lock=True, keep_last=c.keep_last)
    stop_request.on_exit.append(checkpointer.release)
    run_inputs = dict(tokenizer=tok.fingerprint(), data=c.data, total_batch_size=plan.total_batch_size,
                      max_seq_len=c.max_seq_len, recipe=c.recipe)
    resume = resume_point(c, checkpointer, dataclasses.asdict(plan.model), run_inputs, tok)
    if resume is not None:
        check_horizon(c, resume.step, plan, checkpointer.steps())
    return checkpointer, resume, run_inputs


def check_horizon(c: ConfigDict, step: int, plan: Plan, saved: list[int]) -> None:
    """A checkpoint past this run's horizon is refused: the loop would never meet its last step, and past the horizon
    the schedule's warmdown goes on below zero (gradient ascent; nanochat's loop has the same hole). One at the
    horizon is a finished run: nothing to train, the final evaluation runs (what relaunching a finished job does).
    saved: the directory's checkpoint steps, for the advice."""
    N, flag = plan.num_iterations, plan.horizon_source
    if step == N:
        print0(f"Checkpoint step {step} is this run's horizon ({N} steps, from {flag}): nothing left to train; "
               f"running the final evaluation")
    elif step > N:
        longer = (f"{flag}={step + 1} or more" if flag == "--num-iterations" else
                  f"a larger {flag}; --dry-run shows the steps")
        earlier = [s for s in saved if s <= N]
        shorter = (f"to end a shorter run, resume an earlier checkpoint with --resume-from-step=N, N in {earlier[-5:]} "
                   f"(newer ones are moved aside)" if earlier else
                   f"for a shorter run, train a new --model-tag (no checkpoint at or before step {N})")
        raise UserError(f"checkpoint step {step} of {model_tag(c)} is past this run's horizon of {N} steps (from "
                        f"{flag}): to train on, resume with a horizon of more than {step} steps ({longer}); {shorter}")


def resume_point(c, checkpointer: Checkpointer, model_config: dict, inputs: dict, tok) -> Resume | None:
    """The checkpoint to resume from (None: start at 0), its meta record read once and checked against this run
    before anything compiles."""
    resume = str(c.resume_from_step)
    if resume == "last" and not checkpointer.steps():
        print0(f"No checkpoint in {checkpointer.directory} yet: starting from step 0")
        resume = "-1"
    if resume == "-1":
        return None
    step = checkpointer.resolve_step(resume)
    meta = checkpointer.read_meta(step)
    # The tokenizer first: another one (a retrained tok_train) also explains a vocab_size that differs below.
    check_recorded(tok, recorded_tokenizer(meta), f"checkpoint step {step} of {model_tag(c)}",
                   otherwise="train a new --model-tag")
    saved_model = {"recipe": recipes.DEFAULT, **meta["model_config"]}  # saved before recipes: 348fbb3's
    if saved_model["recipe"] != c.recipe:
        raise UserError(f"checkpoint step {step} of {model_tag(c)} was trained with --recipe={saved_model['recipe']}: "
                        f"resume it with --recipe={saved_model['recipe']} (not {c.recipe}), or train a new --model-tag")
    if saved_model != model_config:  # before restoring: shapes would not fit
        differ = {k: (v, saved_model.get(k)) for k, v in model_config.items() if saved_model.get(k) != v}
        raise UserError(f"checkpoint step {step} of {model_tag(c)} was saved with another model "
                        f"({', '.join(f'{k}: saved {b}, now {a}' for k, (a, b) in differ.items())}; vocab_size comes "
                        f"from the tokenizer): use the flags and tokenizer of the saving run")
    changes = input_changes(meta.get("inputs", {}), inputs)
    if c.allow_batch_size_change:
        changes.pop("total_batch_size", None)
    if changes:
        hint = (" (or accept the new --total-batch-size knowingly with --allow-batch-size-change=true)"
                if "total_batch_size" in changes else "")
        raise UserError(f"checkpoint step {step} of {model_tag(c)} was trained with other inputs ("
                        + ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in changes.items())
                        + f"): resume with the saving run's inputs, or train a new --model-tag{hint}")
    loop = LoopState(step=step, val_bpb=meta["val_bpb"], **meta["loop_state"])
    return Resume(step, resume_data(c, step, saved_states(meta)), loop)


def resume_data(c: ConfigDict, step: int, states: list[dict]) -> list[dict]:
    """A checkpoint's loader states, checked: one per data shard this run reads, saved on the train shards here (or
    changes accepted with --allow-data-change)."""
    shards = c.data_shards or jax.process_count()
    if len(states) != shards:
        raise UserError(f"checkpoint step {step} was saved with {len(states)} data shard(s), this run reads "
                        f"{shards}: resume with --data-shards={len(states)} (a multiple of the process count)")
    check_resume_data(states, c.data, c.allow_data_change, f"checkpoint step {step} of {model_tag(c)} was saved")
    return states


def report_plan(c: ConfigDict, step_memory: memory.StepMemory, plan: Plan) -> None:
    """The device batch auto chose, the memory prediction and its warnings, the plan's start-up facts."""
    if c.device_batch_size == memory.AUTO:
        print0(f"--device-batch-size=auto: {plan.device_batch_size} ({step_memory.grad_accum} accumulation steps for "
               f"the total batch of {plan.total_batch_size:,} tokens); predicted " + ", ".join(
                   f"{b}: {fmt_bytes(n)}" for b, n in step_memory.tried.items()))
    print0(step_memory.summary())
    for warning in (memory.over_capacity_warning(step_memory), device_batch_warning(plan.device_batch_size)):
        if warning:
            print0(warning)
    for line in plan.summary():
        print0(line)


# ----------------------------------------------------------------------------------------------------------------
# Restore or start


def restore_or_start(run: Run, params, opt_state) -> TrainState:
    """The loop's state at its first step: from the checkpoint set-up chose, or step 0."""
    c, checkpointer = run.c, run.checkpointer
    loader, loop = run.loader("train"), LoopState()
    if run.resume is not None:
        params, opt_state = restore(run, loader)
        loop = dataclasses.replace(run.resume.loop)  # the loop's own, changed as it goes
    elif run.init_from:
        params, opt_state, meta = nanochat_ckpt.start_from(run.init_from, run.plan.model, run.targets, opt_state,
                                                           c.resume_optimizer)
        print0(f"Initialised from {run.init_from.path} (nanochat step {meta['step']}"
               f"{', with its optimizer state' if c.resume_optimizer else ''})")
    # A rollback (or a fresh start over old checkpoints): newer steps would collide with this run's saves.
    if aside := checkpointer.move_aside_after(loop.step):
        print0(f"Checkpoints newer than step {loop.step} moved aside to {aside} (move them back to undo)")
    monitor = Monitor(c.run, run.user_config,
                      os.path.join(base_dir(), "tensorboard", run.model_tag) if c.tensorboard else None,
                      wandb_dir=base_dir())
    return TrainState(params, opt_state, loop, loader, monitor, SaveTimer(c.save_every_minutes),
                      resume_step=loop.step if run.resume is not None else None, consumed=loader.get_state())


def restore(run: Run, loader: ShardLoaders) -> tuple[Any, Any]:
    """(params, opt_state) of the checkpoint set-up chose; the loader continues where that step's data ended."""
    step = run.resume.step
    params, opt_state, _ = run.checkpointer.restore(step, *run.targets)  # the meta record: read by resume_point
    _, per_process, first = shard_layout(run.c.data_shards, run.plan.device_batch_size)
    loader.set_state(run.resume.loader_states[first:][:per_process], allow_data_change=run.c.allow_data_change)
    print0(f"Resumed from step {step} of {run.checkpointer.directory}")
    return params, opt_state


# ----------------------------------------------------------------------------------------------------------------
# The loop


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


def evaluate_at_step(run: Run, state: TrainState, step: int, last: bool) -> None:
    """Validation bpb, CORE and samples when their --*-every (or the last step) says so."""
    c, loop, guard = run.c, state.loop, functools.partial(evaluation_guard, step=step, checkpointer=run.checkpointer)
    flops = run.plan.flops_per_token * run.plan.total_batch_size * step
    if last or (c.eval_every > 0 and step % c.eval_every == 0):
        with guard("validation"):
            batches = (tuple(global_batch(np.asarray(a, np.int32), run.row_sharding) for a in rows)
                       for rows in run.loader("val"))
            loop.val_bpb = evaluate_bpb(run.bpb_step, state.params, batches, run.eval_steps, run.token_bytes)
        loop.min_val_bpb = min(loop.min_val_bpb, loop.val_bpb)
        print0(f"Step {step:05d} | Validation bpb: {loop.val_bpb:.6f}")
        state.monitor.log({"step": step, "total_training_flops": flops, "total_training_time": loop.total_training_time,
                           "val/bpb": loop.val_bpb}, step)
    if run.core_bundle and (last or (step > 0 and step % c.core_metric_every == 0)):
        from jaxchat.eval import core_eval
        with guard("the CORE evaluation"):
            results = core_eval.evaluate_core(nnx.merge(run.graphdef, state.params), run.tok,
                                              bundle_dir=run.core_bundle, max_per_task=c.core_metric_max_per_task)
        print0(f"Step {step:05d} | CORE metric: {results['core']:.4f}")
        state.monitor.log({"step": step, "total_training_flops": flops, "core_metric": results["core"],
                           "centered_results": {k: v["centered"] for k, v in results["tasks"].items()}}, step)
    if c.sample_every > 0 and (last or (step > 0 and step % c.sample_every == 0)):
        with guard("sampling"):
            prompts = [run.tok.encode(p, prepend_bos=True) for p in SAMPLE_PROMPTS]
            for prompt, out in zip(prompts, greedy_generate(run.graphdef, state.params, prompts, 16,
                                                            {run.tok.bos_id})):
                print0(run.tok.decode(prompt + out))


def save(run: Run, state: TrainState, step: int, kind: str) -> None:
    """Start saving a checkpoint (asynchronously) with every data shard's position, in rank order, for exact resume;
    "Saved checkpoint" is printed once it is committed."""
    loader_states = [s for states in gather_json(state.consumed) for s in states]
    loop = state.loop
    # Steps asked for with --save-every are kept, whatever else (a timer, a signal) also saves there.
    kind = "step" if kind != "final" and run.c.save_every > 0 and step % run.c.save_every == 0 else kind
    meta = dict(step=step, val_bpb=loop.val_bpb, model_config=dataclasses.asdict(run.plan.model),
                user_config=run.user_config, inputs=run.run_inputs, device_batch_size=run.plan.device_batch_size,
                max_seq_len=run.c.max_seq_len, total_batch_size=run.plan.total_batch_size,
                dataloader_state_dict=loader_states[0], dataloader_states=loader_states,
                loop_state=dict(min_val_bpb=loop.min_val_bpb, smooth_train_loss=loop.smooth_train_loss,
                                total_training_time=loop.total_training_time), kind=kind)
    run.checkpointer.save(step, state.params, state.opt_state, meta)
    state.save_timer.reset()
    state.last_saved = step


def next_batch(run: Run, state: TrainState) -> tuple[tuple[jax.Array, jax.Array], list[dict]]:
    """One step's (inputs, targets) on the devices, and the loader state once they are consumed."""
    return step_batch(state.loader, run.plan.grad_accum_steps, run.batch_sharding), state.loader.get_state()


def train_one_step(run: Run, state: TrainState, step: int, batch) -> tuple[float, float, float, tuple | None]:
    """(loss, seconds, LR multiplier, the next step's batch read while this one ran); OOM and NaN stop the run."""
    c, N = run.c, run.plan.num_iterations
    values = optim.schedule_values(step, num_iterations=N, warmup_ratio=c.warmup_ratio,
                                   warmdown_ratio=c.warmdown_ratio, final_lr_frac=c.final_lr_frac,
                                   weight_decay=run.wd_scaled, warmup_steps=c.warmup_steps,
                                   schedules=run.recipe.schedules)
    t0 = time.perf_counter()
    try:
        state.params, state.opt_state, metrics = run.train_step(state.params, state.opt_state, *batch,
                                                                optim.schedule_arrays(values))
        ahead = next_batch(run, state) if step + 1 < N else None  # host work while the step runs on the devices
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])  # waits for the step
    except Exception as e:
        if not memory.is_oom(e):
            raise
        # A save in flight finishes; nothing new is saved (the donated state is gone).
        raise UserError(memory.oom_message(run.step_memory, step, run.checkpointer.last_complete())) from None
    dt = time.perf_counter() - t0
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
        stop_on_non_finite(step, loss, grad_norm, run.checkpointer)
    return loss, dt, values["lrm"], ahead


def stop_on_non_finite(step: int, loss: float, grad_norm: float, checkpointer: Checkpointer) -> None:
    """Stop before anything poisoned is saved, naming the last good checkpoint."""
    what = "loss" if not np.isfinite(loss) else "gradient norm"
    last = checkpointer.last_complete()
    checkpointer.close()
    where = (f"the last good checkpoint is step {last} in {checkpointer.directory}: resume with "
             f"--resume-from-step={last} and lower learning rates") if last is not None else "no checkpoint was saved yet"
    raise UserError(f"step {step}: non-finite {what} (loss {loss}, gradient norm {grad_norm}); stopped without "
                    f"saving; {where}")


def log_step(run: Run, state: TrainState, step: int, loss: float, dt: float, lrm: float) -> None:
    """The debiased loss EMA, training time and ETA, nanochat's step line and the monitor's scalars."""
    c, loop, N = run.c, state.loop, run.plan.num_iterations
    loop.smooth_train_loss = 0.9 * loop.smooth_train_loss + 0.1 * loss
    debiased = loop.smooth_train_loss / (1 - 0.9 ** (step + 1))
    if step > 10:  # the first steps include compilation and warm-up (as in nanochat's scripts/base_train.py)
        loop.total_training_time += dt
    flops_per_step = run.plan.flops_per_token * run.plan.total_batch_size
    mfu = 100 * flops_per_step / dt / (peak_flops(run.device_kind) * jax.device_count())
    eta = (N - step) * loop.total_training_time / (step - 10) if step > 10 else None
    if step % c.log_every == 0:
        print0(step_line(step, N, debiased, lrm, dt, int(run.plan.total_batch_size / dt), mfu, state.loader.epoch,
                         loop.total_training_time, eta, "bf16_mfu" if c.fp8 else "mfu"))
    if step % 100 == 0:
        state.monitor.log({"step": step, "total_training_flops": flops_per_step * step,
                           "total_training_time": loop.total_training_time, "train/loss": debiased, "train/lrm": lrm,
                           "train/dt": dt, "train/tok_per_sec": run.plan.total_batch_size / dt, "train/mfu": mfu,
                           "train/epoch": state.loader.epoch}, step)


def save_or_stop(run: Run, state: TrainState, stop_request: StopRequest, step: int) -> None:
    """Between steps: a timer save, or after a signal a save and exit (the last step goes on to its final save, whose
    evaluation then stops at its first batch)."""
    N = run.plan.num_iterations
    stop = stop_request.requested()
    if stop and step < N:
        stop_run(run, state, stop_request, step, f"after step {step - 1}")
    if step < N and state.save_timer.due():
        save(run, state, step, kind="time")
    run.checkpointer.poll()  # "Saved checkpoint" for a save that committed in the background


def stop_run(run: Run, state: TrainState, stop_request: StopRequest, step: int, when: str) -> None:
    """After a signal: save the state at `step` unless its checkpoint exists (resumed from, or saved before the
    evaluation the signal stopped), wait until it is committed, then exit with the signal's code and one line. A
    fresh run's step 0 has no checkpoint: a signal during its first validation saves it (it said "checkpoint 0
    saved" when nothing was)."""
    if step not in (state.resume_step, state.last_saved):
        save(run, state, step, kind="preempt")
    run.checkpointer.close()
    then = ("--resume-from-step=last runs the final evaluation again" if step == run.plan.num_iterations else
            "continue with --resume-from-step=last")
    print0(f"Stopped by {signal.Signals(stop_request.signum or signal.SIGTERM).name} {when}: checkpoint {step} saved "
           f"in {run.checkpointer.directory}; {then}")
    sys.exit(stop_request.exit_code)


def run_loop(run: Run, state: TrainState, stop_request: StopRequest) -> dict[int, float]:
    """Save, evaluate, train one step, repeat until the plan's last step; returns {step: loss}."""
    c, N = run.c, run.plan.num_iterations
    losses = {}
    stop_request.training = True  # signals now stop at a step boundary, or an evaluation's batch, with a save
    # The next step's batch is read while this step runs on the devices (dispatch is asynchronous), so a checkpoint
    # records the loader state of the batches trained on, not of the one read ahead.
    ahead = None
    step = state.loop.step
    while True:
        last = step == N
        # Save before evaluating: an evaluation that fails (a val shard gone, a broken task file) loses nothing.
        if step not in (state.resume_step, state.last_saved) and (last or (c.save_every > 0 and step > 0 and
                                                                          step % c.save_every == 0)):
            save(run, state, step, kind="final" if last else "step")
        try:
            evaluate_at_step(run, state, step, last)
        except Stopped:  # a signal during an evaluation: it stops at its next batch, the step is saved first
            stop_run(run, state, stop_request, step,
                     "during the final evaluation" if last else f"during the evaluation at step {step}")
        if last:
            break
        if os.environ.get("JAXCHAT_TEST_DIE_AT_STEP") == str(step):  # test hook: a sudden death (OOM killer, node loss)
            run.checkpointer.wait()  # so the test knows which checkpoint must survive
            os.kill(os.getpid(), signal.SIGKILL)
        batch, loader_state = ahead or next_batch(run, state)
        loss, dt, lrm, ahead = train_one_step(run, state, step, batch)
        state.consumed = loader_state
        losses[step] = loss
        log_step(run, state, step, loss, dt, lrm)
        step += 1
        state.loop.step = step
        save_or_stop(run, state, stop_request, step)
    return losses


def finish(run: Run, state: TrainState, stop_request: StopRequest, losses: dict[int, float]) -> dict:
    """Wait for the last save, close the logs, print nanochat's closing lines."""
    run.checkpointer.close()
    if stop_request.signum is not None:  # a signal after the evaluation's last batch, or during the save: all is saved
        print0(f"Stopped by {signal.Signals(stop_request.signum).name} at the end: the final checkpoint "
               f"{state.loop.step} is saved in {run.checkpointer.directory}")
        sys.exit(stop_request.exit_code)
    # All is saved: a signal from here on (closing the logs can take long) exits at once.
    stop_request.finished(f"after the final checkpoint {state.loop.step} was saved in {run.checkpointer.directory}: "
                          f"exiting")
    state.monitor.close()
    stats = jax.local_devices()[0].memory_stats()  # jax.devices()[0] belongs to process 0
    peak_mib = stats["peak_bytes_in_use"] / 2**20 if stats else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print0(f"Peak memory usage: {peak_mib:.2f}MiB" + ("" if stats else " (host process; no device statistics)"))
    print0(f"Total training time: {state.loop.total_training_time / 60:.2f}m")
    print0(f"Minimum validation bpb: {state.loop.min_val_bpb:.6f}")
    return {"losses": losses, "loop": state.loop}


def train(argv: list[str]) -> dict:
    """Run training in this process (tests, scripts); returns {"losses": {step: loss}, "loop": LoopState}. Nothing of
    the process is set up (the command's SETUP), and the caller gets its signal handlers back."""
    return train_with(parse_flags(argv))


def train_with(c: ConfigDict, command_line: bool = False) -> dict:
    """Train with these flags (the process set up before, for a multi-process run joined: `main`).

    command_line: keep handling signals until the process has exited (in-process callers get their handlers back)."""
    if c.dry_run:
        return dry_run(c)
    stop_request = StopRequest()  # from here on a signal ends the run cleanly (130 / 143 / 129, at most one line)
    try:
        run, params, opt_state = set_up(c, stop_request)
        state = restore_or_start(run, params, opt_state)
        losses = run_loop(run, state, stop_request)
        return finish(run, state, stop_request, losses)
    finally:
        if command_line:
            # The process is ending: a signal during its clean-up (library threads joined, temporary files removed)
            # is one line, not a KeyboardInterrupt traceback from wherever it lands.
            stop_request.finished("while exiting: exiting at once")
        for release in stop_request.on_exit:  # the checkpoint lock, also when the run fails
            release()
        if not command_line:
            stop_request.restore_handlers()


# `python -m jaxchat.train`: malloc keeps freed host memory (XLA:CPU's step buffers), the persistent compilation cache
# (--compile-cache) and the multi-process start (--coordinator-address, ...; or the environment)
SETUP = cli.Setup(keep_freed_memory=True, compile_cache=True, distributed=True)


def main() -> None:
    cli.run(functools.partial(train_with, command_line=True), sys.argv[1:], parse=parse_flags, setup=SETUP)


if __name__ == "__main__":
    main()
