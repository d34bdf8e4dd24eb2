"""`python -m jaxchat.aot --target=h100|v5e|... --devices=8 [--hosts=N] <train flags or --config=...>`: compile the
real train step for GPUs or TPUs that are not here, as `python -m jaxchat.train` would on them, and print what XLA's
compiler made of it: per-device memory against the target's usable memory, the device batch `auto` picks there,
compile time, the kernel inventory (cuDNN or splash attention, cuBLASLt and fp8 GEMMs, collectives, anything that
should not be there) and, on GPUs, a roofline projection of the step's time (jaxchat.training.projection).

No accelerator is needed. GPUs: the CUDA plugin (`pip install "jax[cuda12]==<the installed jax version>"`); XLA's GPU
compiler runs on the host with the target's description (jaxchat.runtime.targets). TPUs: libtpu (`pip install
"jax[tpu]==<the installed jax version>"`), whose XLA:TPU compiler takes a slice's topology (v5e:2x4, v5p:2x2x2...)
and refuses at compile time a program that does not fit a chip. The figures are XLA's prediction; what a real run
measures can differ (the GPU autotuner's choices, the CUDA runtime's own memory).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

from jaxchat.runtime import cli, xla_flags
from jaxchat.runtime.common import UserError
from jaxchat.runtime.targets import GPU_TARGETS, HOST_BOUNDS, MULTI_HOST_CHIPS, TPU_TARGETS

def topology_devices(target: str, devices: int, hosts: int | None = None) -> list:
    """Compile-only devices of a slice or of `hosts` x `devices / hosts` GPUs of the target (None: the target's usual
    hosts: one for GPUs, TpuTarget.default_hosts for TPUs)."""
    if target in TPU_TARGETS:
        return _tpu_devices(target, devices, hosts)
    _needs_plugin("cuda", target)
    hosts = hosts or 1
    if devices <= 0 or hosts <= 0 or devices % hosts:
        raise UserError(f"--devices={devices} must be a positive multiple of --hosts={hosts}")
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{devices // hosts}",
                                            target_config=GPU_TARGETS[target].proto_text())
    return list(topology.devices)


def _needs_plugin(platform: str, target: str) -> None:
    """The compiler for `target` is JAX's plugin for its platform (no device needed): one line if it is missing."""
    from jaxchat.runtime import backend

    if platform not in backend.installed_plugins():
        raise UserError(f"compiling for {target} needs JAX's {platform} plugin (not a device): "
                        f"{backend.PLUGINS[platform][1]}")


def _tpu_devices(target: str, chips: int, hosts: int | None) -> list:
    """Compile-only chips of a TPU slice (platform "tpu"), from libtpu's topology of that generation and shape."""
    tpu = TPU_TARGETS[target]
    if tpu.usable_bytes is None:
        raise UserError(f"--target={target}: libtpu describes {target} chips as two devices each (no megacore), not "
                        f"the chips a {target} VM runs on; compile for one of {', '.join(_compilable_tpus())}")
    smallest = 1 if tpu.dims == 2 else 4
    if chips < smallest or chips & (chips - 1):
        raise UserError(f"--devices={chips}: a {target} slice has a power-of-two number of chips, at least {smallest}")
    hosts = hosts or tpu.default_hosts(chips)
    if not (hosts == 1 and chips <= tpu.one_host_chips or hosts > 1 and chips == MULTI_HOST_CHIPS * hosts):
        raise UserError(f"--hosts={hosts}: a {target} VM has up to {tpu.one_host_chips} chips alone and "
                        f"{MULTI_HOST_CHIPS} in a slice over several hosts: use --hosts={tpu.default_hosts(chips)}")
    _needs_plugin("tpu", target)
    # Compile-only, no chip opened: this process need not hold libtpu's lock (/tmp/libtpu_lockfile; a training run on
    # this TPU VM, or a second compile, would otherwise be refused), nor ask a cloud metadata server which slice it
    # is on (the topology says), nor know its peers (without a name libtpu prints three lines of warnings)
    for name, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                        ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(name, value)
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(topology_name=tpu.topology_name(chips), platform="tpu",
                                            chips_per_host_bounds=HOST_BOUNDS[chips // hosts])
    return list(topology.devices)


def _compilable_tpus() -> list[str]:
    return sorted(name for name, tpu in TPU_TARGETS.items() if tpu.usable_bytes is not None)


def target_memory(target: str) -> tuple[str, int, str]:
    """(device kind, usable bytes per device, where that number comes from) of a target."""
    if target in TPU_TARGETS:
        tpu = TPU_TARGETS[target]
        return tpu.device_kind, tpu.usable_bytes, f"{tpu.device_kind} HBM XLA:TPU may use"
    gpu = GPU_TARGETS[target]
    fraction = xla_flags.memory_fraction()
    return gpu.device_kind, int(gpu.memory_bytes * fraction), f"{gpu.device_kind} x {fraction}"


def compile_for_target(argv: list[str], *, target: str, devices: int, hosts: int | None = None,
                       reproject: tuple[str, ...] = ()) -> dict:
    """The train step of these train flags compiled for the target; its memory plan and kernel inventory as a dict
    (reproject: other GPUs whose figures the same program is projected with, under "reprojections").

    jaxchat's XLA flags must be in $XLA_FLAGS before the process's first backend starts (cli.run and the tests'
    conftest apply them): with XLA's defaults every GEMM is a Triton fusion and there is no fp8 GEMM."""
    from jaxchat.model import fp8
    from jaxchat.model import mesh as meshlib
    from jaxchat.training import build, inventory
    from jaxchat.training.config import parse_flags

    c = parse_flags(argv)
    target_devices = topology_devices(target, devices, hosts)
    mesh = meshlib.make_mesh(c.fsdp, devices=target_devices)
    run_backend = build.backend_for(c, mesh)
    plan = build.run_plan(c, build.planned_vocab(c)[0], device_batch_size=c.device_batch_size or 1,
                          data_parallel_size=mesh.size)
    device_kind, usable, source = target_memory(target)
    t0 = time.perf_counter()
    plan_memory = build.compile_train_step(c, plan, mesh, run_backend,
                                           capacity=None if c.memory_budget_gb > 0 else (usable, source),
                                           log=lambda line: print(line, file=sys.stderr, flush=True)).memory
    compile_s = time.perf_counter() - t0
    analysis = plan_memory.compiled.memory_analysis()
    hlo = plan_memory.compiled.as_text()
    counts = inventory.count(hlo)
    per_step = plan.model.n_layer * plan_memory.grad_accum  # attention calls expected per step
    fp8_layers = fp8.qualifying_matmuls(plan.model) * plan_memory.grad_accum if run_backend.fp8 else 0
    per_layer = lambda *kinds: [counts[k] / per_step for k in kinds]  # noqa: E731
    return dict(
        target=target, platform=run_backend.platform, device_kind=device_kind, devices=devices,
        hosts=len({d.process_index for d in target_devices}), mesh=dict(mesh.shape), depth=plan.model.n_layer,
        seq_len=c.max_seq_len, compute_dtype=run_backend.compute_dtype, fp8=run_backend.fp8,
        attention=run_backend.attention, note=run_backend.note, remat=plan_memory.variant,
        device_batch_size=plan_memory.device_batch_size, grad_accum=plan_memory.grad_accum,
        auto_tried={str(k): v for k, v in plan_memory.tried.items()},
        argument_bytes=analysis.argument_size_in_bytes, temp_bytes=analysis.temp_size_in_bytes,
        peak_bytes=plan_memory.predicted_bytes, usable_bytes=plan_memory.capacity_bytes,
        fits=plan_memory.fits, compile_s=round(compile_s, 1),
        cudnn_attention_per_layer=per_layer("cudnn_attention_fwd", "cudnn_attention_bwd"),
        splash_per_layer=per_layer("splash_fwd", "splash_dq", "splash_dkv"),
        cublas_gemms=counts["cublas_gemms"], fp8_gemms=counts["fp8_gemms"],
        fp8_gemms_per_qualifying_layer=counts["fp8_gemms"] / fp8_layers if fp8_layers else None,
        fp8_gemms_f32_out=counts["fp8_gemms_f32_out"], bf16_qualifying_gemms=counts["bf16_qualifying_gemms"],
        triton_gemms=counts["triton_gemms"], f32_gemms=counts["f32_gemms"],
        async_collectives={k.split(":")[1]: v for k, v in counts.items() if k.startswith("async:")},
        sync_collectives={k.split(":")[1]: v for k, v in counts.items() if k.startswith("sync:")},
        loop_collectives={k.split(":")[1]: v for k, v in counts.items() if k.startswith("loop:")},
        loop_stacked_writes=counts["loop_stacked_writes"],
        cpu_attention=counts["cpu_attention"], unknown_trip_counts=counts["unknown_trip_counts"],
        problems=problems(counts, run_backend, per_step, fp8_layers, fsdp=mesh.shape["fsdp"] > 1),
        projection=project(hlo, target, devices, plan),
    ) | ({"reprojections": {other: project(hlo, other, devices, plan) for other in reproject}} if reproject else {})


def project(hlo: str, target: str, devices: int, plan) -> dict | None:
    """The roofline projection of this program's step on the target (jaxchat.training.projection); None for TPUs (the
    model reads XLA:GPU's kernels: cuBLAS GEMMs, cuDNN attention, NCCL collectives)."""
    if target not in GPU_TARGETS:
        return None
    from jaxchat.training import projection
    result = projection.project(hlo, GPU_TARGETS[target], devices=devices, tokens_per_step=plan.total_batch_size,
                                flops_per_token=plan.flops_per_token, steps=plan.num_iterations, name=target)
    return dataclasses.asdict(result)


def problems(counts, run_backend, attention_calls: int, fp8_layers: int, fsdp: bool = False) -> list[str]:
    """What should not be in a GPU or TPU train step: CPU attention, attention not the platform's fused kernel, f32
    GEMMs in a bf16 step, missing fp8 GEMMs under --fp8, GPU collectives that do not overlap compute; where the
    backend reduces gradients once per step (Backend.per_device_gradients), collectives inside the layer or
    micro-batch loops (FSDP's per-layer all-gathers and reduce-scatters excepted); where it unrolls the layers
    (Backend.scan_layers), a scanned layer stack's residuals written into stacked buffers."""
    found = []
    allowed = ("all-gather", "reduce-scatter") if fsdp else ()
    looped = {k.split(":")[1]: v for k, v in counts.items() if k.startswith("loop:") and k[5:] not in allowed}
    if run_backend.per_device_gradients and looped:
        found.append(f"collectives inside the layer or micro-batch loops: {looped}")
    if not run_backend.scan_layers and counts["loop_stacked_writes"]:
        found.append(f"{counts['loop_stacked_writes']} stacked residual writes inside loops (a scanned layer stack)")
    if counts["cpu_attention"]:
        found.append("jaxchat's CPU attention")
    if run_backend.attention == "cudnn" and counts["cudnn_attention_fwd"] < attention_calls:
        found.append(f"cuDNN attention in {counts['cudnn_attention_fwd']} of {attention_calls} layer calls")
    if run_backend.attention == "splash" and min(counts["splash_fwd"], counts["splash_dkv"]) < attention_calls:
        found.append(f"splash attention in {counts['splash_fwd']} of {attention_calls} layer calls")
    if run_backend.compute_dtype != "float32" and counts["f32_gemms"]:
        found.append(f"{counts['f32_gemms']} float32 GEMMs in a {run_backend.compute_dtype} step")
    # XLA may merge GEMMs that share an operand (q, k and v's forward, or their weight gradients, at width 768) into
    # one fp8 GEMM, so the check is that no dense layer's GEMM stayed bf16, not a count
    if run_backend.fp8 and run_backend.fp8_gemms and (counts["bf16_qualifying_gemms"] or not counts["fp8_gemms"]):
        found.append(f"{counts['bf16_qualifying_gemms']} bf16 GEMMs of dense-layer size under --fp8 "
                     f"({counts['fp8_gemms']} fp8 GEMMs)")
    # XLA:GPU starts a collective that overlaps compute as an async pair (all-reduce-start/-done); XLA:TPU schedules
    # and overlaps its collectives itself (fused, or in its own AsyncCollectiveStart calls), so there a bare one is
    # no sign of anything
    if run_backend.platform == "gpu" and counts["sync_collectives"]:
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
    ]
    if r["platform"] == "tpu":
        rows += [
            ("splash attention",
             "fwd {:g}, dq {:g}, dkv {:g} per layer and micro-batch".format(*r["splash_per_layer"])),
            ("collectives", ", ".join(f"{k} {v}" for k, v in sorted(_merged(r).items())) or "none"),
        ]
    else:
        rows += [
            ("cuDNN attention", "fwd {:g}, bwd {:g} per layer and micro-batch".format(*r["cudnn_attention_per_layer"])),
            ("GEMMs", f"cuBLASLt {r['cublas_gemms']}, fp8 {r['fp8_gemms']}"
                      + (f" ({r['fp8_gemms_per_qualifying_layer']:g} per qualifying layer call)" if r["fp8"] else "")
                      + (f", {r['fp8_gemms_f32_out']} of them writing float32" if r["fp8_gemms_f32_out"] else "")
                      + f", Triton {r['triton_gemms']}, float32 {r['f32_gemms']}"),
            ("collectives", f"async {r['async_collectives']}, sync {r['sync_collectives']}; inside loops "
                            f"{r['loop_collectives'] or 'none'}"),
        ]
    rows += [("note", r["note"])] if r["note"] else []
    rows += projection_rows(r.get("projection"))
    rows.append(("problems", "; ".join(r["problems"]) or "none"))
    return "\n".join(f"{name:>18}: {text}" for name, text in rows)


PROJECTION_LABEL = ("roofline model of XLA's optimised program, not a measurement; assumptions in "
                    "jaxchat/runtime/targets.py")


def projection_rows(p: dict | None) -> list[tuple[str, str]]:
    """The projection's rows of the table: its label, the step and its parts, what follows from it."""
    if p is None:
        return [("projection", "n/a on TPUs (the roofline model reads XLA:GPU's kernels)")]
    ms = {k: v * 1e3 for k, v in p["breakdown_s"].items()}
    return [
        ("projection", PROJECTION_LABEL),
        ("projected step", f"{p['step_s'] * 1e3:.1f} ms = GEMMs {ms['gemm']:.1f} + attention {ms['attention']:.1f} + "
                           f"other memory-bound {ms['memory']:.1f} + launch gaps {ms['launch']:.1f} + exposed "
                           f"collectives {ms['collective_exposed']:.1f} (busy {p['collective_busy_s'] * 1e3:.1f}); "
                           f"{p['kernels']:,} kernels"),
        ("projected speed", f"{p['tokens_per_s_per_device']:,.0f} tokens/s per device, "
                            f"{p['tokens_per_s_per_node']:,.0f} per node; MFU (nanochat's) {p['mfu']:.1%}; "
                            f"{p['horizon_steps']:,} steps in {p['horizon_s'] / 3600:.2f} h"),
    ]


def _merged(r: dict) -> dict[str, int]:
    """Collectives per kind, async or not."""
    merged = dict(r["async_collectives"])
    for kind, n in r["sync_collectives"].items():
        merged[kind] = merged.get(kind, 0) + n
    return merged


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other flag is python -m jaxchat.train's (--depth, --fp8, --config=configs/d24.py, ...).")
    parser.add_argument("--target", default="h100", choices=sorted(GPU_TARGETS) + sorted(TPU_TARGETS),
                        help="the GPU, or the TPU generation (a slice of --devices chips), to compile for")
    parser.add_argument("--devices", type=int, default=8, help="GPUs or TPU chips in all")
    parser.add_argument("--hosts", type=int, default=None,
                        help="hosts (processes) they are spread over (default: 1 for GPUs; a TPU slice's own)")
    parser.add_argument("--reproject", default="", help="comma-separated GPUs (" + ", ".join(sorted(GPU_TARGETS))
                        + ") whose figures the same compiled program is also projected with (JSON only)")
    args, train_argv = parser.parse_known_args(argv)
    reproject = tuple(name for name in args.reproject.split(",") if name)
    if unknown := [name for name in reproject if name not in GPU_TARGETS]:
        raise UserError(f"--reproject={args.reproject}: {', '.join(unknown)} is not one of {', '.join(GPU_TARGETS)}")
    result = compile_for_target(train_argv, target=args.target, devices=args.devices, hosts=args.hosts,
                                reproject=reproject)
    print(table(result))
    print(json.dumps(result))
    if result["problems"] or not result["fits"]:
        sys.exit(1)


# `python -m jaxchat.aot`: compiling needs no device, so none starts (a GPU host's included) unless JAX_PLATFORMS names
# one. No persistent compilation cache: a compile-only client cannot load a cached executable ("PjRtCompiler must be
# constructed with a Client"), so every run compiles.
SETUP = cli.Setup(compile_only=True)

if __name__ == "__main__":
    cli.run(main, sys.argv[1:], setup=SETUP)
