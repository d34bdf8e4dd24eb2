"""`python -m jaxchat.aot --target=h100 --devices=8 [--hosts=N] <train flags or --config=...>`: compile the real
train step for GPUs that are not here, as `python -m jaxchat.train` would on them, and print what XLA's GPU compiler
made of it: per-device memory against the target's usable memory, the device batch `auto` picks there, compile time
and the kernel inventory (cuDNN attention, cuBLASLt and fp8 GEMMs, collectives, anything that should not be there).

Needs the CUDA plugin (`pip install "jax[cuda12]==<the installed jax version>"`), no GPU: XLA's GPU compiler runs on
the host with the target's description (jaxchat.targets) instead of a device. The figures are XLA's prediction; what
a real run measures can differ by the autotuner's choices and the CUDA runtime's own memory.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported: no device is needed, none is started

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from jaxchat import xla_flags  # noqa: E402
from jaxchat.common import UserError, run_main  # noqa: E402
from jaxchat.targets import GPU_TARGETS  # noqa: E402

DENSE_NAMES = ("c_q", "c_k", "c_v", "c_proj", "c_fc", "mlp_proj")  # the per-layer dense weights (model.Blocks)


def topology_devices(target: str, devices: int, hosts: int) -> list:
    """Compile-only devices of `hosts` x `devices / hosts` GPUs of the target (platform "gpu")."""
    if importlib.util.find_spec("jax_cuda12_plugin") is None and importlib.util.find_spec("jax_cuda13_plugin") is None:
        import jax
        raise UserError(f"compiling for {target} needs the CUDA plugin (no GPU): pip install "
                        f"\"jax[cuda12]=={jax.__version__}\"")
    if devices <= 0 or hosts <= 0 or devices % hosts:
        raise UserError(f"--devices={devices} must be a positive multiple of --hosts={hosts}")
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{devices // hosts}",
                                            target_config=GPU_TARGETS[target].proto_text())
    return list(topology.devices)


def qualifying_fp8_layers(config) -> int:
    """Dense layers that run in fp8 under --fp8 (jaxchat.fp8.qualifies): per layer q, k, v, both projections, c_fc;
    and the lm_head."""
    from jaxchat import fp8
    from jaxchat.model import abstract_model
    model = abstract_model(config)
    per_layer = sum(fp8.qualifies(*getattr(model.blocks, name).shape[1:]) for name in DENSE_NAMES)
    return per_layer * config.n_layer + fp8.qualifies(*model.lm_head.shape)


def compile_for_target(argv: list[str], *, target: str, devices: int, hosts: int = 1) -> dict:
    """The train step of these train flags compiled for the target; its memory plan and kernel inventory as a dict.

    jaxchat's XLA flags must be in $XLA_FLAGS before the process's first backend starts (`main` and the tests'
    conftest call xla_flags.apply()): with XLA's defaults every GEMM is a Triton fusion and there is no fp8 GEMM."""
    from jaxchat import backend, inventory, step
    from jaxchat import mesh as meshlib
    from jaxchat.config import parse_flags
    from jaxchat.train import build_optimizer, planned_vocab, run_plan

    c = parse_flags(argv)
    mesh = meshlib.make_mesh(c.fsdp, devices=topology_devices(target, devices, hosts))
    run_backend = backend.for_mesh(mesh, c.compute_dtype or None)
    vocab_size, _ = planned_vocab(c)
    plan = run_plan(c, vocab_size, device_batch_size=c.device_batch_size or 1, data_parallel_size=mesh.size)
    tx, _ = build_optimizer(c, plan, mesh, run_backend.default_dtype(c.muon_dtype))
    _, train_steps, targets = step.abstract_steps(
        plan.model, tx, mesh, remat=c.remat, compute_dtype=run_backend.compute_dtype, loss_chunk=c.loss_chunk,
        embed_dtype=c.embed_dtype, fp8=c.fp8, backend=run_backend)
    gpu = GPU_TARGETS[target]
    usable = int(gpu.memory_bytes * xla_flags.memory_fraction())
    t0 = time.perf_counter()
    plan_memory = step.plan_and_compile(
        train_steps, targets, mesh, device_batch_size=c.device_batch_size, total_batch_size=plan.total_batch_size,
        seq_len=c.max_seq_len, budget_gb=c.memory_budget_gb,
        capacity=None if c.memory_budget_gb > 0 else (usable, f"{gpu.device_kind} x {xla_flags.memory_fraction()}"))
    compile_s = time.perf_counter() - t0
    analysis = plan_memory.compiled.memory_analysis()
    counts = inventory.count(plan_memory.compiled.as_text())
    per_step = plan.model.n_layer * plan_memory.grad_accum  # attention calls expected per step
    fp8_layers = qualifying_fp8_layers(plan.model) * plan_memory.grad_accum if c.fp8 else 0
    return dict(
        target=target, device_kind=gpu.device_kind, devices=devices, hosts=hosts, mesh=dict(mesh.shape),
        depth=plan.model.n_layer, seq_len=c.max_seq_len, compute_dtype=run_backend.compute_dtype, fp8=c.fp8,
        attention=run_backend.attention, remat=plan_memory.variant, device_batch_size=plan_memory.device_batch_size,
        grad_accum=plan_memory.grad_accum, auto_tried={str(k): v for k, v in plan_memory.tried.items()},
        argument_bytes=analysis.argument_size_in_bytes, temp_bytes=analysis.temp_size_in_bytes,
        peak_bytes=plan_memory.predicted_bytes, usable_bytes=plan_memory.capacity_bytes,
        fits=plan_memory.fits, compile_s=round(compile_s, 1),
        cudnn_attention_per_layer=[counts["cudnn_attention_fwd"] / per_step, counts["cudnn_attention_bwd"] / per_step],
        cublas_gemms=counts["cublas_gemms"], fp8_gemms=counts["fp8_gemms"],
        fp8_gemms_per_qualifying_layer=counts["fp8_gemms"] / fp8_layers if fp8_layers else None,
        triton_gemms=counts["triton_gemms"], f32_gemms=counts["f32_gemms"],
        async_collectives={k.split(":")[1]: v for k, v in counts.items() if k.startswith("async:")},
        sync_collectives={k.split(":")[1]: v for k, v in counts.items() if k.startswith("sync:")},
        cpu_attention=counts["cpu_attention"], unknown_trip_counts=counts["unknown_trip_counts"],
        problems=problems(counts, run_backend, c.fp8, per_step, fp8_layers),
    )


def problems(counts, run_backend, fp8: bool, attention_calls: int, fp8_layers: int) -> list[str]:
    """What should not be in a GPU train step: CPU attention, attention not cuDNN's, f32 GEMMs in a bf16 step,
    missing fp8 GEMMs under --fp8, collectives that do not overlap compute."""
    found = []
    if counts["cpu_attention"]:
        found.append("jaxchat's CPU attention")
    if run_backend.attention == "cudnn" and counts["cudnn_attention_fwd"] < attention_calls:
        found.append(f"cuDNN attention in {counts['cudnn_attention_fwd']} of {attention_calls} layer calls")
    if run_backend.compute_dtype != "float32" and counts["f32_gemms"]:
        found.append(f"{counts['f32_gemms']} float32 GEMMs in a {run_backend.compute_dtype} step")
    if fp8 and run_backend.fp8_gemms and counts["fp8_gemms"] < 3 * fp8_layers:
        found.append(f"{counts['fp8_gemms']} fp8 GEMMs for {fp8_layers} qualifying layer calls (3 each expected)")
    if counts["sync_collectives"]:
        found.append(f"{counts['sync_collectives']} synchronous collectives")
    return found


def table(r: dict) -> str:
    """The result as the lines a user reads."""
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    rows = [
        ("target", f"{r['devices']} x {r['device_kind']} ({r['hosts']} host(s)), mesh {r['mesh']}"),
        ("step", f"d{r['depth']}, T {r['seq_len']}, {r['compute_dtype']}{' + fp8' if r['fp8'] else ''}, "
                 f"attention {r['attention']}, remat {r['remat']}"),
        ("device batch", f"{r['device_batch_size']} x {r['grad_accum']} micro-batch(es)"
                         + (f" (auto tried {r['auto_tried']})" if len(r["auto_tried"]) > 1 else "")),
        ("memory per device", f"arguments {gib(r['argument_bytes'])}, temporaries {gib(r['temp_bytes'])}, "
                              f"peak {gib(r['peak_bytes'])} of {gib(r['usable_bytes'])} usable "
                              f"({r['peak_bytes'] / r['usable_bytes']:.0%}; fits within 90%: {r['fits']})"),
        ("compile", f"{r['compile_s']} s"),
        ("cuDNN attention", "fwd {:g}, bwd {:g} per layer and micro-batch".format(*r["cudnn_attention_per_layer"])),
        ("GEMMs", f"cuBLASLt {r['cublas_gemms']}, fp8 {r['fp8_gemms']}"
                  + (f" ({r['fp8_gemms_per_qualifying_layer']:g} per qualifying layer call)" if r["fp8"] else "")
                  + f", Triton {r['triton_gemms']}, float32 {r['f32_gemms']}"),
        ("collectives", f"async {r['async_collectives']}, sync {r['sync_collectives']}"),
        ("problems", "; ".join(r["problems"]) or "none"),
    ]
    return "\n".join(f"{name:>18}: {text}" for name, text in rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other flag is python -m jaxchat.train's (--depth, --fp8, --config=configs/d24.py, ...).")
    parser.add_argument("--target", default="h100", choices=sorted(GPU_TARGETS), help="the GPU to compile for")
    parser.add_argument("--devices", type=int, default=8, help="GPUs in all")
    parser.add_argument("--hosts", type=int, default=1, help="hosts (processes) they are spread over")
    args, train_argv = parser.parse_known_args(argv)
    xla_flags.apply()  # the flags `python -m jaxchat.train` runs with, before the backend starts
    # No persistent compilation cache here: a compile-only client cannot load a cached executable ("PjRtCompiler
    # must be constructed with a Client"), so every run compiles.
    result = compile_for_target(train_argv, target=args.target, devices=args.devices, hosts=args.hosts)
    print(table(result))
    print(json.dumps(result))
    if result["problems"] or not result["fits"]:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
