"""Does reading the next batch hide behind the step? The real loader and the real compiled train step, two ways in
the same run: serial (read, then step, then wait: the baseline) and read-ahead (dispatch the step, read the next
batch while it runs, then wait: what `jaxchat.train` does). One JSON line.

    python bench/input_pipeline.py                       # demo corpus and model (CPU: a minute)
    python bench/input_pipeline.py --config.depth=12 --config.max_seq_len=2048 --config.device_batch_size=16 \\
        --config.total_batch_size=65536                  # GPU-sized step, still on the demo corpus
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxchat.training import recipe

from jaxchat.data.dataloader import make_loaders, prepare_data, step_batch
from jaxchat.model import mesh as meshlib
from jaxchat.runtime import backend
from jaxchat.runtime import xla_flags
from jaxchat.training import optim
from jaxchat.training.config import optimizer_flags, parse_flags
from jaxchat.training.plan import make_plan
from jaxchat.training.step import compile_step, init_training


def set_up(c, steps: int) -> tuple:
    """(plan, params, opt_state, compiled step, schedule, train loader) for the flags, on the demo data."""
    mesh = meshlib.make_mesh(c.fsdp)
    dtype = backend.for_mesh(mesh).compute_dtype
    tok, files = prepare_data(c.data)
    plan = make_plan(depth=c.depth, aspect_ratio=c.aspect_ratio, head_dim=c.head_dim, max_seq_len=c.max_seq_len,
                     vocab_size=tok.vocab_size, window_pattern=c.window_pattern, num_iterations_flag=steps,
                     target_flops=-1, target_param_data_ratio=c.target_param_data_ratio,
                     total_batch_size=c.total_batch_size, device_batch_size=c.device_batch_size,
                     data_parallel_size=jax.device_count())
    tx = optim.make_optimizer(**optimizer_flags(), **recipe.get("348fbb3").optimizer_options(), model_dim=plan.model.n_embd, weight_decay=0.2, muon_dtype=jnp.dtype(dtype),
                              muon_stack_sharding=meshlib.muon_stack_sharding(mesh))
    _, params, opt_state, train_step, targets = init_training(plan.model, tx, mesh, seed=0,
                                                              compute_dtype=dtype)
    step = compile_step(train_step, *targets, mesh, device_batch_size=c.device_batch_size,
                        grad_accum=plan.grad_accum_steps, seq_len=c.max_seq_len)
    values = optim.schedule_values(0, num_iterations=1000, warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0,
                                   weight_decay=0.2)
    loader = make_loaders(tok, files["train"], device_batch_size=c.device_batch_size, seq_len=c.max_seq_len,
                          data_shards=c.data_shards)
    return plan, params, opt_state, step, optim.schedule_arrays(values), loader, meshlib.batch_sharding(mesh)


def main(argv: list[str]) -> dict:
    steps = 10
    c = parse_flags(["--config=configs/demo.py", *argv])
    plan, params, opt_state, step, schedule, loader, batch_sh = set_up(c, steps)
    read_times = []

    def next_batch():
        t0 = time.perf_counter()
        batch = step_batch(loader, plan.grad_accum_steps, batch_sh)
        read_times.append(time.perf_counter() - t0)
        return batch

    def serial():
        nonlocal params, opt_state
        batch = next_batch()
        params, opt_state, metrics = step(params, opt_state, *batch, schedule)
        float(metrics["loss"])

    ahead = None

    def read_ahead():
        nonlocal params, opt_state, ahead
        batch = ahead or next_batch()
        params, opt_state, metrics = step(params, opt_state, *batch, schedule)
        ahead = next_batch()
        float(metrics["loss"])

    def timed(fn) -> float:
        for _ in range(2):  # warm-up (and the loader's first buffer fill)
            fn()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    serial_s, ahead_s = timed(serial), timed(read_ahead)
    result = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                  depth=c.depth, seq_len=c.max_seq_len, device_batch_size=c.device_batch_size,
                  grad_accum=plan.grad_accum_steps, tokens_per_step=c.total_batch_size,
                  read_s=statistics.median(read_times), serial_step_s=serial_s, read_ahead_step_s=ahead_s,
                  speedup=serial_s / ahead_s)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    xla_flags.apply()
    main(sys.argv[1:])
