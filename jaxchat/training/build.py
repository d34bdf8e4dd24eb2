"""The run a set of train flags describes, built: its plan, its optimizer and its train step compiled for a mesh.

One path for `python -m jaxchat.train` (its devices) and `python -m jaxchat.aot` (a target's devices, compile only),
so the program aot reports is the one train runs; bench/gpu_check.py times it.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import GPTConfig
from jaxchat.runtime import backend
from jaxchat.runtime.common import UserError, print0
from jaxchat.training import memory
from jaxchat.training import optim
from jaxchat.training import recipe as recipes
from jaxchat.training import step
from jaxchat.training.config import optimizer_flags
from jaxchat.training.plan import Plan, make_plan


def run_plan(c: ConfigDict, vocab_size: int, device_batch_size: int, data_parallel_size: int | None = None) -> Plan:
    """The plan for the flags (jaxchat.training.plan): sizes, horizon, the batch (the recipe's auto batch for -1) and
    the recipe's transfer of the LRs and the Muon weight decay; over every device unless data_parallel_size says."""
    return make_plan(depth=c.depth, aspect_ratio=c.aspect_ratio, head_dim=c.head_dim, max_seq_len=c.max_seq_len,
                     vocab_size=vocab_size, window_pattern=c.window_pattern, num_iterations_flag=c.num_iterations,
                     target_flops=c.target_flops, target_param_data_ratio=c.target_param_data_ratio,
                     total_batch_size=c.total_batch_size, device_batch_size=device_batch_size,
                     data_parallel_size=data_parallel_size or jax.device_count(), recipe=c.recipe,
                     weight_decay=c.weight_decay)


def planned_vocab(c: ConfigDict) -> tuple[int, str]:
    """(vocabulary size, where it came from) without building anything: the tokenizer if trained, else nanochat's."""
    from jaxchat.data.tokenizer import Tokenizer, default_dir
    try:
        return Tokenizer.load(default_dir(c.data)).vocab_size, "the tokenizer"
    except UserError:
        return 32768, "nanochat's default: no tokenizer trained yet"


def build_optimizer(c: ConfigDict, plan: Plan, mesh, muon_dtype: str) -> tuple[Any, float]:
    """(MuonAdamW, scaled Muon weight decay) for the flags and the recipe, as nanochat's scripts/base_train.py sets
    them up (the plan holds the batch LR scale and the weight decay its recipe's rule gives)."""
    t = plan.transfer
    tx = optim.make_optimizer(model_dim=plan.model.n_embd, **optimizer_flags(c), weight_decay=t.weight_decay_scaled,
                              batch_lr_scale=t.batch_lr_scale, muon_dtype=jnp.dtype(muon_dtype),
                              muon_stack_sharding=meshlib.muon_stack_sharding(mesh),
                              **recipes.get(c.recipe).optimizer_options())
    print0(plan.summary()[-1])  # the recipe, batch LR scale and Muon weight decay, before the long compile
    return tx, t.weight_decay_scaled


def backend_for(c: ConfigDict, mesh) -> backend.Backend:
    """What the mesh's platform runs these flags with (--compute-dtype, --fp8): decided once, for the whole run."""
    return backend.for_mesh(mesh, c.compute_dtype or None, c.fp8)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The train step of a run's flags compiled for its mesh, with what built it."""

    config: GPTConfig  # the plan's model
    tx: Any  # MuonAdamW (build_optimizer)
    wd_scaled: float  # the Muon weight decay after the recipe's transfer: the schedule's peak
    model_options: dict  # GPT's keyword arguments: compute dtype, loss chunk, embedding dtype, fp8, backend
    graphdef: Any  # the model of the --remat policy compiled
    targets: tuple  # abstract (params, opt_state) with their shardings: initial state's and a restore's layout
    memory: memory.StepMemory  # the executable, its device batch (auto decided) and predicted memory

    def initial_state(self, seed: int) -> tuple:
        """(params, opt_state) of a fresh run, created sharded as the step takes them."""
        return step.init_state(self.config, self.tx, self.targets, seed=seed, remat=self.memory.variant,
                               **self.model_options)


def compile_train_step(c: ConfigDict, plan: Plan, mesh, run_backend: backend.Backend, *,
                       capacity: tuple[int, str] | None = None, log=None) -> CompiledStep:
    """The flags' train step on the mesh, compiled for the device batch (auto: the largest predicted to fit the
    device's memory, or `capacity` (bytes, source): a target's); `log`: memory.plan_step's lines.

    A --max-seq-len no device batch holds is refused from the shapes first, before anything is traced."""
    tx, wd_scaled = build_optimizer(c, plan, mesh, run_backend.default_dtype(c.muon_dtype))
    options = dict(compute_dtype=run_backend.compute_dtype, loss_chunk=c.loss_chunk,
                   embed_dtype=run_backend.embed_dtype(c.embed_dtype), fp8=run_backend.fp8, backend=run_backend)
    memory.check_length(plan.model, run_backend, c.memory_budget_gb, capacity)
    graphdefs, train_steps, targets = step.abstract_steps(plan.model, tx, mesh, remat=c.remat, **options)
    compiled = step.plan_and_compile(train_steps, targets, mesh, device_batch_size=c.device_batch_size,
                                     total_batch_size=plan.total_batch_size, seq_len=c.max_seq_len,
                                     budget_gb=c.memory_budget_gb, capacity=capacity, log=log)
    return CompiledStep(plan.model, tx, wd_scaled, options, graphdefs[compiled.variant], targets, compiled)
