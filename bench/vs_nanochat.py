"""jaxchat's train step against nanochat's (model + MuonAdamW) at the same shape, step by step in turn.

Both projects run as they do by default on the backend: float32 compute on CPU, bfloat16 on GPU (nanochat: autocast
on CUDA, `torch.compile` of the model as scripts/base_train.py does unless --torch-eager). Each side runs in its own
worker process (its own allocator, threads and memory, as each project trains alone), and the two take turns one
step at a time, so load from elsewhere on the machine hits both alike. jaxchat's worker sets glibc's malloc as
`python -m jaxchat.train` does (jaxchat.runtime.host_memory); --nanochat-malloc gives nanochat's worker the same. Prints
one JSON line: each side's median step, forward+backward and optimizer times, and `ratio` = jaxchat steps/s / nanochat
steps/s; also each step's CPU time, `cpu_ratio` and the load average, for a machine that other processes keep busy.

    git clone https://github.com/karpathy/nanochat /tmp/nanochat && git -C /tmp/nanochat checkout 348fbb3
    pip install -e ".[torch]"                            # torch: only here and in jaxchat.export
    python bench/vs_nanochat.py --nanochat-dir=/tmp/nanochat --depth=4 --width=256 --head-dim=64 --seq-len=256 \\
        --batch=8 --vocab=4096 --window-pattern=L       # the d4 CPU shape
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat.training import recipe

from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import GPTConfig
from jaxchat.runtime import backend
from jaxchat.runtime import cli, host_memory
from jaxchat.runtime.common import UserError
from jaxchat.training import optim
from jaxchat.training.config import config_for_depth
from jaxchat.training.config import optimizer_flags
from jaxchat.training.step import init_training


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanochat-dir", required=True, help="a nanochat checkout (the directory holding nanochat/gpt.py)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=0, help="model width; 0: depth x --aspect-ratio rounded to --head-dim")
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="rows per step (one micro-batch)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (medians are reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side after compiling")
    p.add_argument("--turn-warmup", type=int, default=0,
                   help="untimed steps at the start of each turn: on a VM whose host reclaims memory left idle while "
                        "the other side runs (seconds-long steps), the first step of a turn pays to fault it back in")
    p.add_argument("--torch-eager", action="store_true", help="nanochat's model without torch.compile")
    p.add_argument("--nanochat-malloc", action="store_true",
                   help="give nanochat's worker jaxchat's malloc setting too (jaxchat.runtime.host_memory; jaxchat's worker "
                        "has it, as `python -m jaxchat.train` does): how much of the ratio is the allocator")
    return p.parse_args(argv)


def model_config(a) -> GPTConfig:
    if a.width:
        if a.width % a.head_dim:
            raise UserError(f"--width={a.width} must be a multiple of --head-dim={a.head_dim}")
        return GPTConfig(sequence_len=a.seq_len, vocab_size=a.vocab, n_layer=a.depth, n_head=a.width // a.head_dim,
                         n_kv_head=a.width // a.head_dim, n_embd=a.width, window_pattern=a.window_pattern)
    return config_for_depth(a.depth, aspect_ratio=a.aspect_ratio, head_dim=a.head_dim, max_seq_len=a.seq_len,
                            vocab_size=a.vocab, window_pattern=a.window_pattern)


def median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 2)


class NanochatSide:
    """nanochat's GPT and MuonAdamW (setup_optimizer's defaults) built from the user's checkout, as base_train does."""

    def __init__(self, nanochat_dir: str, config: GPTConfig, tokens: np.ndarray, eager: bool):
        try:
            import torch
        except ImportError:
            raise UserError("torch is not installed: `pip install torch` (only this bench needs it)") from None
        sys.path.insert(0, os.path.abspath(nanochat_dir))
        from nanochat.gpt import GPT, GPTConfig as NanoConfig

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        with contextlib.redirect_stdout(sys.stderr):  # nanochat's print0 lines stay off the JSON output
            with torch.device("meta"):
                model = GPT(NanoConfig(**{k: getattr(config, k) for k in ("sequence_len", "vocab_size", "n_layer",
                                                                          "n_head", "n_kv_head", "n_embd",
                                                                          "window_pattern")}))
            model.to_empty(device=self.device)
            model.init_weights()
            self.optimizer = model.setup_optimizer()
        self.model = model if eager else torch.compile(model, dynamic=False)
        self.autocast = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if self.device == "cuda"
                         else contextlib.nullcontext())
        t = torch.from_numpy(tokens.astype(np.int64)).to(self.device)
        self.inputs, self.targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        self.compute = "bfloat16" if self.device == "cuda" else "float32"
        self.name = torch.cuda.get_device_name() if self.device == "cuda" else cpu_name()

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def step(self) -> tuple[float, float, float, float]:
        """(step, forward+backward, optimizer, step's CPU time) seconds for one training step."""
        self.sync()
        c0, t0 = time.process_time(), time.perf_counter()
        with self.autocast:
            loss = self.model(self.inputs, self.targets)
        loss.backward()
        self.sync()
        t1 = time.perf_counter()
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        self.sync()
        t2 = time.perf_counter()
        return t2 - t0, t1 - t0, t2 - t1, time.process_time() - c0


class JaxchatSide:
    """jaxchat's real train step (the one `python -m jaxchat.train` runs) and its two halves, each jitted alone."""

    def __init__(self, config: GPTConfig, tokens: np.ndarray):
        compute_dtype = muon_dtype = backend.local().compute_dtype
        mesh = meshlib.make_mesh(1, devices=jax.devices()[:1])  # one device, like nanochat's single process
        self.tx = optim.make_optimizer(**optimizer_flags(), **recipe.get("348fbb3").optimizer_options(), model_dim=config.n_embd, weight_decay=0.2, muon_dtype=jnp.dtype(muon_dtype),
                                       muon_stack_sharding=meshlib.muon_stack_sharding(mesh))
        self.graphdef, self.params, self.opt_state, self.train_step, _ = init_training(
            config, self.tx, mesh, seed=0, compute_dtype=compute_dtype)
        batch = meshlib.batch_sharding(mesh)
        self.inputs, self.targets = (jax.device_put(a[None], batch) for a in (tokens[:, :-1], tokens[:, 1:]))
        values = optim.schedule_values(0, num_iterations=1000, warmup_ratio=0.0, warmdown_ratio=0.5,
                                       final_lr_frac=0.0, weight_decay=0.2)
        self.schedule = optim.schedule_arrays(values)
        self.compute = compute_dtype
        self.name = jax.devices()[0].device_kind if jax.default_backend() == "gpu" else cpu_name()
        from flax import nnx

        def loss_fn(p):
            return nnx.merge(self.graphdef, p)(self.inputs[0], self.targets[0])

        self.grad_fn = jax.jit(jax.value_and_grad(loss_fn))
        self.update_fn = jax.jit(lambda g, s, p: self.tx.update(g, optim.set_schedule(s, self.schedule), p))
        self.grads = None

    def step(self) -> tuple[float, float, float, float]:
        """(real step, forward+backward alone, optimizer alone, real step's CPU time) seconds."""
        c0, t0 = time.process_time(), time.perf_counter()
        self.params, self.opt_state, metrics = self.train_step(self.params, self.opt_state, self.inputs,
                                                               self.targets, self.schedule)
        jax.block_until_ready(metrics)
        t1, cpu = time.perf_counter(), time.process_time() - c0
        loss, self.grads = jax.block_until_ready(self.grad_fn(self.params))
        t2 = time.perf_counter()
        jax.block_until_ready(self.update_fn(self.grads, self.opt_state, self.params))
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, cpu


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform's name elsewhere), with the core count."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores"


def make_side(name: str, a) -> "NanochatSide | JaxchatSide":
    config = model_config(a)
    tokens = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.seq_len + 1), dtype=np.int32)
    return NanochatSide(a.nanochat_dir, config, tokens, a.torch_eager) if name == "nanochat" else JaxchatSide(config,
                                                                                                              tokens)


def worker(name: str, argv: list[str]) -> None:
    """One side in this process: a JSON line when built, then one JSON line of timings per "step" read on stdin."""
    a = parse(argv)
    malloc = host_memory.keep_freed_memory() if name == "jaxchat" or a.nanochat_malloc else False
    side = make_side(name, a)
    version = side.torch.__version__ if name == "nanochat" else jax.__version__
    print(json.dumps(dict(name=side.name, compute=side.compute, version=version, backend=jax.default_backend(),
                          malloc=malloc)), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            return
        print(json.dumps(side.step()), flush=True)


class Worker:
    """A side's worker process: `python vs_nanochat.py --worker=NAME ARGS`; its stderr goes to ours."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--worker={name}", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.reply()

    def reply(self):
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(code if code else 1)  # the worker has printed its error line
        return json.loads(line)

    def step(self) -> list[float]:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def bench(argv: list[str]) -> dict:
    a = parse(argv)
    if a.steps < 1 or a.warmup < 1 or a.turn_warmup < 0:
        raise UserError(f"--steps={a.steps} and --warmup={a.warmup} must be at least 1, --turn-warmup="
                        f"{a.turn_warmup} at least 0")
    config = model_config(a)
    if not os.path.isfile(os.path.join(a.nanochat_dir, "nanochat", "gpt.py")):
        raise UserError(f"--nanochat-dir={a.nanochat_dir}: no nanochat/gpt.py there; clone nanochat and pass its root")
    sides = {}
    try:
        for name in ("nanochat", "jaxchat"):
            sides[name] = Worker(name, argv)
        times = {name: [] for name in sides}
        for i in range(a.warmup + a.steps):  # in turn, so load from elsewhere on the machine hits both alike
            for name, side in sides.items():
                for _ in range(a.turn_warmup):
                    side.step()
                t = side.step()
                if i >= a.warmup:
                    times[name].append(t)
    finally:
        for side in sides.values():
            side.close()
    result = dict(depth=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, seq_len=a.seq_len,
                  batch=a.batch, vocab=a.vocab, window_pattern=config.window_pattern, steps=a.steps,
                  backend=sides["jaxchat"].info["backend"], machine=sides["jaxchat"].info["name"], jax=jax.__version__,
                  torch=sides["nanochat"].info["version"], torch_compile=not a.torch_eager,
                  processes="one per side", turn_warmup=a.turn_warmup, xla_flags=os.environ.get("XLA_FLAGS", ""))
    for name, side in sides.items():
        step, fwd_bwd, opt, cpu = (median_ms([t[j] for t in times[name]]) for j in range(4))
        result[name] = dict(step_ms=step, fwd_bwd_ms=fwd_bwd, optimizer_ms=opt, step_cpu_ms=cpu,
                            compute_dtype=side.info["compute"], keep_freed_memory=side.info["malloc"])
    result["ratio"] = round(result["nanochat"]["step_ms"] / result["jaxchat"]["step_ms"], 3)
    # CPU seconds per step (all threads): a second view when other processes load the machine, as a busy host slows
    # a side whose threads wait on each other (torch's OpenMP barriers) more than its work alone would.
    result["cpu_ratio"] = round(result["nanochat"]["step_cpu_ms"] / result["jaxchat"]["step_cpu_ms"], 3)
    result["load_avg_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0].startswith("--worker="):
        cli.run(worker, argv[0].removeprefix("--worker="), argv[1:])
    else:
        cli.run(bench, argv)  # XLA flags applied as for `python -m jaxchat.train`


if __name__ == "__main__":
    main()
