"""The GPU check: jaxchat's real train step and nanochat's on one GPU, at d12 and d24, T 2048, in one run.

Per jaxchat case (depth x bf16/--fp8), in a process of its own: the step built and compiled as `python -m
jaxchat.train` builds it (its flags, jaxchat.train's plan and optimizer, jaxchat.training.step's compile), cold in an
empty persistent compilation cache, then timed (block_until_ready on every step, the median of the steady steps after
the warm-up), the GPU's measured peak (`peak_bytes_in_use`), then compiled again warm: jax's in-memory caches cleared,
the program loaded from the persistent cache that the cold compile filled (its hits counted). Beside each case, `python
-m jaxchat.aot --target=h100 --devices=1` with the same flags (XLA's predicted peak for that target, and its projection
where this checkout's aot has one), run on the CPU while nanochat runs on the GPU. Per depth, nanochat's GPT and
MuonAdamW built as its scripts/base_train.py builds them (bench/vs_nanochat.py's NanochatSide: torch.compile, bf16
autocast), timed the same way at the same shape, in its own process. One micro-batch per step on both sides
(--total-batch-size = device batch x T). MFU: nanochat's count of FLOPs per token (jaxchat.model.gpt.estimate_flops)
over the device's bf16 peak (jaxchat.runtime.targets.peak_flops), for both sides and for --fp8 too, as nanochat labels
bf16_mfu.

Each phase has a timeout and the whole run a budget (--budget-s): a phase that fails or runs out is reported as such
and the others still run. Prints a table, then one JSON line (the last line). `--dry-run`: the same path on CPU at a
tiny shape (d2, T 64, 2 steps), nanochat only where torch and a checkout are there.

    bash bench/gpu_check.sh                      # on the GPU machine: installs .gpu_check/wheels, then this
    python bench/gpu_check.py --dry-run          # anywhere, in seconds
"""

import argparse
import collections
import concurrent.futures
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
DEFAULT_NANOCHAT = ROOT / ".gpu_check" / "nanochat-348fbb3"  # bench/prepare_gpu_check.sh puts it there
# The device batch --device-batch-size=auto picks for one 80 GB H100 at T 2048 (jaxchat.aot --devices=1, bf16 and
# --fp8: d12 at 32, d24 at 16, predicted 58.0 GiB bf16 of the 75.2 GiB jaxchat lets JAX take); fixed here so that
# both sides run the same shape and the cold compile is one compile.
DEVICE_BATCH = {12: 32, 24: 16}
CACHE_EVENTS = ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, d2, T 64, 2 steps: the same path in seconds")
    p.add_argument("--nanochat-dir", default=os.environ.get("NANOCHAT_DIR") or str(DEFAULT_NANOCHAT),
                   help="a nanochat checkout (holding nanochat/gpt.py); default $NANOCHAT_DIR, else "
                        ".gpu_check/nanochat-348fbb3")
    p.add_argument("--depths", default=None,
                   help="comma-separated, run in this order (default 24,12: if the budget runs out, d12 goes first; "
                        "dry run 2)")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048; dry run 64")
    p.add_argument("--device-batch-size", type=int, default=None,
                   help=f"rows per step for every depth (default {DEVICE_BATCH}, else 16; dry run 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 10; dry run 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compiling (default 3; dry run 1)")
    p.add_argument("--no-fp8", action="store_true", help="bf16 cases only")
    p.add_argument("--torch-eager", action="store_true",
                   help="nanochat's model without torch.compile (always in a dry run: compiling on CPU takes minutes)")
    p.add_argument("--budget-s", type=float, default=430.0,
                   help="seconds for the whole run: phases not started by then are reported as skipped")
    p.add_argument("--aot-jobs", type=int, default=4, help="jaxchat.aot compiles at once (CPU only)")
    p.add_argument("extra", nargs="*", help="more jaxchat.train flags for every case (after --)")
    a = p.parse_args(argv)
    tiny = a.dry_run
    a.depths = [int(d) for d in (a.depths or ("2" if tiny else "24,12")).split(",")]
    a.seq_len = a.seq_len or (64 if tiny else 2048)
    a.steps = a.steps or (2 if tiny else 10)
    a.warmup = a.warmup or (1 if tiny else 3)
    if tiny:
        a.aot_jobs, a.torch_eager = 1, True
    return a


def device_batch(a, depth: int) -> int:
    return a.device_batch_size or (2 if a.dry_run else DEVICE_BATCH.get(depth, 16))


def train_flags(a, depth: int, fp8: bool) -> list[str]:
    """The jaxchat.train flags of one case: one micro-batch of the device batch per step."""
    b = device_batch(a, depth)
    return [f"--depth={depth}", f"--max-seq-len={a.seq_len}", f"--device-batch-size={b}",
            f"--total-batch-size={b * a.seq_len}", *(["--fp8"] if fp8 else []), *a.extra]


# ---------------------------------------------------------------------------------------------------------------
# Workers: one case each, in a process of its own (its own GPU memory and peak, a cold compile with nothing cached)


def median_step(step, steps: int, warmup: int) -> tuple[float, list[float]]:
    """(median seconds, timed seconds) of `step()` (which returns after the device is done) after `warmup` calls."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def jaxchat_case(spec: dict) -> dict:
    """jaxchat's train step of these flags on this process's first device: compile cold, time, measure, compile warm."""
    from jaxchat.runtime import host_memory, xla_flags

    xla_flags.apply()  # before the backend starts, as `python -m jaxchat.train` does
    host_memory.keep_freed_memory()
    import jax

    from jaxchat.model import mesh as meshlib
    from jaxchat.runtime import compile_cache
    from jaxchat.training import build
    from jaxchat.training.config import parse_flags

    events = collections.Counter()
    jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
    compile_cache.enable(spec["cache_dir"])  # empty: the first compile is cold and fills it
    c = parse_flags(spec["flags"])
    device = jax.devices()[0]
    mesh = meshlib.make_mesh(1, devices=[device])
    run_backend = build.backend_for(c, mesh)
    plan = build.run_plan(c, build.planned_vocab(c)[0], device_batch_size=c.device_batch_size, data_parallel_size=1)

    def compile_step():  # as `python -m jaxchat.train` compiles it (jaxchat.training.build)
        with contextlib.redirect_stdout(sys.stderr):  # the optimizer's summary line stays off the JSON output
            return build.compile_train_step(c, plan, mesh, run_backend)

    built = compile_step()
    cold_events = {e: events[e] for e in CACHE_EVENTS}
    dt, times, loss, stats = time_jaxchat_step(built, c, plan, mesh, device, spec["steps"], spec["warmup"])
    jax.clear_caches()  # the in-memory executables gone: the next compile can only load from the persistent cache
    before = dict(events)
    warm = compile_step().memory
    cold = built.memory
    return dict(
        jaxchat_result(c, plan, run_backend, device, cold, dt, times, stats),
        compile_s_cold=round(cold.compile_seconds, 2), compile_s_warm=round(warm.compile_seconds, 2),
        cache_cold={e.rsplit("/", 1)[1]: cold_events[e] for e in CACHE_EVENTS},
        cache_warm={e.rsplit("/", 1)[1]: events[e] - before.get(e, 0) for e in CACHE_EVENTS},
        loss=round(loss, 4))


def time_jaxchat_step(built, c, plan, mesh, device, steps: int, warmup: int) -> tuple[float, list[float], float, dict]:
    """(median seconds, timed seconds, last loss, the device's memory stats) of the compiled step
    (jaxchat.training.build's) on random tokens at step 0's schedule, from its initial state; the state is freed on
    return."""
    import jax
    import numpy as np

    from jaxchat.model import mesh as meshlib
    from jaxchat.training import optim
    from jaxchat.training import recipe as recipes

    cold = built.memory
    params, opt_state = built.initial_state(c.seed)
    rows, accum, T = cold.device_batch_size, cold.grad_accum, c.max_seq_len
    tokens = np.random.default_rng(0).integers(0, plan.model.vocab_size, (accum, rows, T + 1), dtype=np.int32)
    inputs, targets_ = (jax.device_put(t, meshlib.batch_sharding(mesh)) for t in (tokens[..., :-1], tokens[..., 1:]))
    values = optim.schedule_values(0, num_iterations=plan.num_iterations, warmup_ratio=c.warmup_ratio,
                                   warmdown_ratio=c.warmdown_ratio, final_lr_frac=c.final_lr_frac,
                                   weight_decay=built.wd_scaled, warmup_steps=c.warmup_steps,
                                   schedules=recipes.get(c.recipe).schedules)
    schedule = optim.schedule_arrays(values)
    state = {"params": params, "opt_state": opt_state}

    def step():
        state["params"], state["opt_state"], state["metrics"] = cold.compiled(
            state["params"], state["opt_state"], inputs, targets_, schedule)
        jax.block_until_ready(state["metrics"])

    dt, times = median_step(step, steps, warmup)
    return dt, times, float(state["metrics"]["loss"]), device.memory_stats()


def jaxchat_result(c, plan, run_backend, device, cold, dt: float, times: list[float], stats: dict | None) -> dict:
    """The case's shape, speed, MFU and memory as the JSON line reports them (cold: the compiled StepMemory)."""
    import jax

    from jaxchat.model.gpt import estimate_flops
    from jaxchat.runtime.targets import peak_flops
    from jaxchat.training import memory

    rows, accum, T = cold.device_batch_size, cold.grad_accum, c.max_seq_len
    tokens_per_step = accum * rows * T
    return dict(
        depth=plan.model.n_layer, n_embd=plan.model.n_embd, fp8=run_backend.fp8, device_batch=rows, grad_accum=accum,
        seq_len=T, remat=cold.variant or c.remat, compute_dtype=run_backend.compute_dtype,
        attention=run_backend.attention, device=device.device_kind, backend=jax.default_backend(),
        jax=jax.__version__, step_ms=round(1000 * dt, 2), step_ms_all=[round(1000 * t, 2) for t in times],
        tokens_per_s=round(tokens_per_step / dt, 1),
        mfu=round(100 * estimate_flops(plan.model) * tokens_per_step / dt / peak_flops(device.device_kind), 2),
        peak_gib_measured=round(stats["peak_bytes_in_use"] / GiB, 2) if stats else None,
        peak_gib_predicted_here=round(memory.peak_bytes(cold.compiled) / GiB, 2))


def nanochat_case(spec: dict) -> dict:
    """nanochat's step (bench/vs_nanochat.py's NanochatSide) at the shape jaxchat's plan gives these flags."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    from vs_nanochat import NanochatSide

    from jaxchat.model.gpt import estimate_flops
    from jaxchat.runtime.targets import peak_flops
    from jaxchat.training.build import planned_vocab, run_plan
    from jaxchat.training.config import parse_flags

    c = parse_flags(spec["flags"])
    config = run_plan(c, planned_vocab(c)[0], device_batch_size=c.device_batch_size, data_parallel_size=1).model
    rows, T = c.device_batch_size, c.max_seq_len
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (rows, T + 1), dtype=np.int32)
    side = NanochatSide(spec["nanochat_dir"], config, tokens, spec["eager"])
    torch = side.torch
    t0 = time.perf_counter()
    side.step()  # torch.compile compiles the model and the optimizer's kernels at the first call
    first_s = time.perf_counter() - t0
    dt, times = median_step(side.step, spec["steps"], spec["warmup"])
    from nanochat import flash_attention  # imported by NanochatSide's model: which attention nanochat found

    cuda = side.device == "cuda"
    tokens_per_step = rows * T
    return dict(
        depth=config.n_layer, device_batch=rows, seq_len=T, device=side.name, torch=torch.__version__,
        compute_dtype=side.compute, torch_compile=not spec["eager"],
        attention="fa3" if flash_attention.HAS_FA3 else "sdpa", step_ms=round(1000 * dt, 2),
        step_ms_all=[round(1000 * t, 2) for t in times], tokens_per_s=round(tokens_per_step / dt, 1),
        mfu=round(100 * estimate_flops(config) * tokens_per_step / dt / peak_flops(side.name), 2),
        peak_gib=round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
        first_step_s=round(first_s, 2), nanochat_commit=_commit(spec["nanochat_dir"]))


def _commit(nanochat_dir: str) -> str | None:
    """The checkout's commit: COMMIT (bench/prepare_gpu_check.sh writes it), else git's."""
    with contextlib.suppress(OSError):
        return Path(nanochat_dir, "COMMIT").read_text().strip()[:7]
    done = subprocess.run(["git", "-C", nanochat_dir, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def worker(name: str, spec_json: str) -> None:
    """Run one case and print its result as the last line."""
    result = {"jaxchat": jaxchat_case, "nanochat": nanochat_case}[name](json.loads(spec_json))
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The run: phases in subprocesses, each with a timeout


def run_json(cmd: list[str], env: dict, timeout: float) -> dict:
    """The JSON object a command prints last, with its wall time; on failure or timeout {"error": ...}. The command
    runs in a process group of its own, ended whole at the timeout (torch's compile workers too)."""
    if timeout <= 0:
        return {"error": "skipped: the run's --budget-s was spent"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": _tail(err)}
    wall = round(time.perf_counter() - t0, 1)
    last = next((line for line in reversed(out.strip().splitlines()) if line.startswith("{")), None)
    if last is None:
        return {"error": f"exit code {proc.returncode}, no JSON line", "stderr_tail": _tail(err), "wall_s": wall}
    result = json.loads(last)
    result["wall_s"] = wall
    if proc.returncode not in (0, 1):  # jaxchat.aot exits 1 after its JSON line when it finds problems
        result["error"] = f"exit code {proc.returncode}"
    return result


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def aot(a, flags: list[str], env: dict, timeout: float) -> dict:
    """`python -m jaxchat.aot --target=h100 --devices=1` on these flags: XLA's predicted peak for one H100 and the
    projection (where this checkout's aot makes one), compiled on the CPU."""
    r = run_json([sys.executable, "-m", "jaxchat.aot", "--target=h100", "--devices=1", *flags],
                 dict(env, JAX_PLATFORMS="cpu"), timeout)
    if "peak_bytes" not in r:
        return {"error": r.get("error", "no peak_bytes"), "stderr_tail": r.get("stderr_tail", "")}
    return dict(peak_gib=round(r["peak_bytes"] / GiB, 2), fits=r["fits"], problems=r["problems"],
                compile_s=r["compile_s"], projection=r.get("projection"), wall_s=r["wall_s"])


def nanochat_skip_reason(a) -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if not os.path.isfile(os.path.join(a.nanochat_dir, "nanochat", "gpt.py")):
        return f"no nanochat checkout at {a.nanochat_dir} (bash bench/prepare_gpu_check.sh, or --nanochat-dir=)"
    return None


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def case_name(depth: int, fp8: bool) -> str:
    return f"d{depth}-{'fp8' if fp8 else 'bf16'}"


def case_timeout(a, depth: int) -> float:
    """Seconds one case may take: d12 156 s, d24 252 s on the GPU; a dry run on a busy 2-core machine (nanochat's
    optimizer compiled on CPU) takes minutes."""
    return 60 + 8 * depth if not a.dry_run else 300


def worker_command(a, kind: str, depth: int, fp8: bool, **spec) -> list[str]:
    """The command line of a worker process (--worker=jaxchat or nanochat) for one case."""
    flags = dict(flags=train_flags(a, depth, fp8), steps=a.steps, warmup=a.warmup, **spec)
    return [sys.executable, os.path.abspath(__file__), f"--worker={kind}", json.dumps(flags)]


def worker_env(a, tmp: str) -> dict:
    """The workers' environment. An empty base directory: no tokenizer there, so every case has nanochat's vocabulary
    (32768), and aot too."""
    env = dict(os.environ, JAXCHAT_BASE_DIR=os.path.join(tmp, "base"), WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if a.dry_run:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    else:  # torch's compile cache there too: nanochat compiles cold, as jaxchat does
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
    return env


def nanochat_cases(a, env: dict, left) -> dict:
    """nanochat's step per depth, each in a worker of its own ({"skipped": why} without torch or a checkout)."""
    nanochat, skip = {}, nanochat_skip_reason(a)
    if skip:
        print(f"nanochat: skipped ({skip})", flush=True)
    for d in a.depths:
        key = f"d{d}"
        if skip:
            nanochat[key] = {"skipped": skip}
            continue
        log(f"nanochat {key}: starting")
        command = worker_command(a, "nanochat", d, False, nanochat_dir=a.nanochat_dir, eager=a.torch_eager)
        nanochat[key] = run_json(command, dict(env, JAX_PLATFORMS="cpu"), min(case_timeout(a, d), left()))
        log(f"nanochat {key}: {_summary(nanochat[key])}")
    return nanochat


def jaxchat_cases(a, cases: list, env: dict, tmp: str, left, aot_runs: dict) -> dict:
    """jaxchat's step per case, each in a worker of its own, with jaxchat.aot's prediction for it beside it."""
    def predicted(key: str) -> dict:
        p = aot_runs[key].result()
        log(f"jaxchat.aot {key}: {p.get('peak_gib', p.get('error'))} GiB predicted")
        return p

    # On the GPU, jaxchat's cold compiles wait for the aot compiles: the CPU is theirs alone. A dry run overlaps them.
    aot_results = {} if a.dry_run else {key: predicted(key) for key in aot_runs}
    jaxchat = {}
    for d, fp8 in cases:
        key = case_name(d, fp8)
        log(f"jaxchat {key}: starting")
        cache = os.path.join(tmp, f"jax_cache_{key}")  # fresh per case: its first compile is cold
        command = worker_command(a, "jaxchat", d, fp8, cache_dir=cache)
        jaxchat[key] = run_json(command, env, min(case_timeout(a, d), left()))
        log(f"jaxchat {key}: {_summary(jaxchat[key])}")
    for key, r in jaxchat.items():
        p = aot_results.get(key) or predicted(key)
        r.update(peak_gib_predicted=p.get("peak_gib"), projection=p.get("projection"), aot=p)
    return jaxchat


def tokens_ratios(jaxchat: dict, nanochat: dict) -> dict:
    """jaxchat's tokens/s over nanochat's at the same depth, per jaxchat case where both ran."""
    ratios = {}
    for key, r in jaxchat.items():
        n = nanochat.get(key.split("-")[0], {})
        if r.get("tokens_per_s") and n.get("tokens_per_s"):
            ratios[key] = round(r["tokens_per_s"] / n["tokens_per_s"], 3)
    return ratios


def run(a) -> dict:
    start = time.perf_counter()
    left = lambda: a.budget_s - (time.perf_counter() - start)  # noqa: E731
    tmp = tempfile.mkdtemp(prefix="gpu_check.")
    env = worker_env(a, tmp)
    cases = [(d, fp8) for d in a.depths for fp8 in ((False,) if a.no_fp8 else (False, True))]

    # jaxchat.aot on the CPU, started first: it runs while nanochat runs on the GPU
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.aot_jobs))
    aot_runs = {case_name(d, fp8): pool.submit(aot, a, train_flags(a, d, fp8), env, min(case_timeout(a, d), left()))
                for d, fp8 in cases}
    log(f"jaxchat.aot: {len(aot_runs)} compiles started ({a.aot_jobs} at once)")
    nanochat = nanochat_cases(a, env, left)
    jaxchat = jaxchat_cases(a, cases, env, tmp, left, aot_runs)
    pool.shutdown()

    first = next((r for r in [*jaxchat.values(), *nanochat.values()] if "device" in r), {})
    return dict(
        check="gpu_check", dry_run=a.dry_run, device=first.get("device"), backend=first.get("backend"),
        jax=_version("jax"), jaxlib=_version("jaxlib"), torch=_version("torch"),
        seq_len=a.seq_len, steps=a.steps, warmup=a.warmup, nanochat_dir=a.nanochat_dir, jaxchat=jaxchat,
        nanochat=nanochat, ratio_tokens_per_s=tokens_ratios(jaxchat, nanochat),
        total_s=round(time.perf_counter() - start, 1))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _summary(r: dict) -> str:
    if "error" in r or "skipped" in r:
        return r.get("error") or r["skipped"]
    return f"{r['step_ms']} ms/step, {r['tokens_per_s']:,.0f} tokens/s"


def table(result: dict) -> str:
    """The run as the rows a reader compares: one per jaxchat case, nanochat's beside it."""
    f = lambda v, fmt="{:,.1f}": "-" if v is None else fmt.format(v)  # noqa: E731
    lines = [f"device: {result['device']}; jax {result['jax']}, torch {result['torch']}; T {result['seq_len']}, "
             f"{result['steps']} timed steps after {result['warmup']}",
             "| case | batch | step ms | tokens/s | MFU | peak GiB measured | XLA predicted (aot / here) | "
             "compile cold / warm s | nanochat step ms | nanochat tokens/s | nanochat MFU | nanochat peak GiB | "
             "jaxchat/nanochat |",
             "|" + "---|" * 13]
    for key, r in result["jaxchat"].items():
        n = result["nanochat"].get(key.split("-")[0], {})
        if "error" in r:
            lines.append(f"| {key} | error: {r['error']} |")
            continue
        lines.append(
            f"| {key} | {r['device_batch']} | {f(r['step_ms'])} | {f(r['tokens_per_s'], '{:,.0f}')} | "
            f"{f(r['mfu'])}% | {f(r['peak_gib_measured'])} | {f(r['peak_gib_predicted'])} / "
            f"{f(r['peak_gib_predicted_here'])} | {f(r['compile_s_cold'])} / {f(r['compile_s_warm'])} | "
            f"{f(n.get('step_ms'))} | {f(n.get('tokens_per_s'), '{:,.0f}')} | {f(n.get('mfu'))}% | "
            f"{f(n.get('peak_gib'))} | {f(result['ratio_tokens_per_s'].get(key), '{:.3f}')} |")
    for key, n in result["nanochat"].items():
        if "error" in n or "skipped" in n:
            lines.append(f"nanochat {key}: {n.get('error') or n['skipped']}")
        else:
            lines.append(f"nanochat {key}: attention {n['attention']}, torch.compile {n['torch_compile']}, "
                         f"first step (compile) {n['first_step_s']} s, commit {n['nanochat_commit']}")
    for key, r in result["jaxchat"].items():
        if "error" not in r and r.get("projection") is None:
            lines.append(f"jaxchat {key}: projection: not available in this checkout")
        elif r.get("projection") is not None:
            lines.append(f"jaxchat {key}: projection {json.dumps(r['projection'])}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0].startswith("--worker="):
        worker(argv[0].removeprefix("--worker="), argv[1])
        return 0
    a = parse(argv)
    result = run(a)
    print(table(result), flush=True)
    print(json.dumps(result), flush=True)
    failed = [k for k, r in [*result["jaxchat"].items(), *result["nanochat"].items()] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
