"""The device mesh and every sharding decision, declared once: logical axis names mapped to mesh axes.

Mesh axes: `data` (pure data parallel) x `fsdp` (data parallel with parameters sharded over it). The batch is split
over both. Parameters are replicated over `data` and sharded over `fsdp`; optimizer state is additionally sharded over
`data` (ZeRO-2, like the reference's DistMuonAdamW), along the stack axis for Muon matrices so that every matrix is
orthogonalised whole on one device; Muon zero-pads a stack that does not divide the devices (muon_stack_sharding).
"""

import os
import socket
import sys
import threading

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxchat.common import UserError

DATA_AXES = ("data", "fsdp")  # the batch is split over every device

# Logical axes of each parameter (paths of model.GPT's parameter tree).
PARAM_AXES = {
    "wte": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "resid_lambdas": (None,),
    "x0_lambdas": (None,),
    "value_embeds": ("stack", "vocab", "embed"),
    "blocks/c_q": ("stack", "embed", "heads"),
    "blocks/c_k": ("stack", "embed", "heads"),
    "blocks/c_v": ("stack", "embed", "heads"),
    "blocks/c_proj": ("stack", "heads", "embed"),
    "blocks/c_fc": ("stack", "embed", "mlp"),
    "blocks/mlp_proj": ("stack", "mlp", "embed"),
    "blocks/ve_gate": ("stack", None, None),
}

# Where logical axes live. Parameters: FSDP shards the model dimension (the stack axis is scanned over, so it stays
# whole). Optimizer state: tables by vocabulary row, matrices by stack entry, over every device.
# Each rule lists candidate mesh axes, first fit wins: a candidate must divide the dimension and use no mesh axis
# that an earlier dimension of the same leaf already uses.
PARAM_RULES = {"embed": [("fsdp",)]}
OPTIMIZER_RULES = {"vocab": [DATA_AXES, ("data",), ("fsdp",)], "stack": [DATA_AXES, ("data",), ("fsdp",)],
                   "embed": [("fsdp",)]}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def _slurm_coordinator() -> str:
    """host:port of the first node of the SLURM step (JAX's rule: first host, port from the job id)."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"]
    head = nodes.split(",")[0]
    if "[" in head:  # node[001-016] or node[001,007-015]: the prefix and the first number of the range
        prefix, _, ranges = nodes.partition("[")
        head = prefix + ranges.split(",")[0].split("-")[0].rstrip("]")
    port = os.environ.get("JAX_COORDINATOR_PORT") or str(int(os.environ["SLURM_JOB_ID"]) % 2**12 + 65535 - 2**12 + 1)
    return f"{head}:{port}"


def _join_timed_out(address: str, process_id: int, num_processes: int, timeout: int) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        what = f"the coordinator at {address} is up but not all {num_processes} processes joined"
    except OSError as e:
        what = f"cannot reach the coordinator at {address} ({e.strerror or e}): is process 0 running there?"
    print(f"error: process {process_id} of {num_processes}: {what} within --init-timeout={timeout} s; start every "
          f"process with the same --coordinator-address (process 0's host:port) and --num-processes",
          file=sys.stderr, flush=True)
    os._exit(2)


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, init_timeout: int = 300, peer_timeout: int = 20) -> None:
    """Join the multi-process runtime when launched as several processes; a no-op for a single process.

    Sources, first found wins: the arguments (--coordinator-address/--num-processes/--process-id), the environment
    variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then SLURM's SLURM_NTASKS / SLURM_PROCID
    (coordinator: the first node of the step). Each process sees all of its host's devices, except under SLURM with
    several tasks per node, where task SLURM_LOCALID gets that one GPU.
    """
    from jaxchat import watchdog

    if watchdog.active():
        return
    slurm = "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes or _env_int("JAX_NUM_PROCESSES") or (_env_int("SLURM_NTASKS") if slurm else None)
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if process_id is None and slurm:
        process_id = _env_int("SLURM_PROCID")
    if not num_processes or num_processes == 1:
        return
    if coordinator_address is None and slurm:
        coordinator_address = _slurm_coordinator()
    if coordinator_address is None or process_id is None:
        raise UserError(f"{num_processes} processes need --coordinator-address=HOST:PORT (of process 0) and "
                        f"--process-id (or JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process-id={process_id} must be in 0..{num_processes - 1}")
    local_device_ids = None  # every device of the host: one process per node
    if slurm and (_env_int("SLURM_NTASKS_PER_NODE") or 1) > 1:
        local_device_ids = [_env_int("SLURM_LOCALID") or 0]
    # Cross-process collectives on CPU need gloo (the default only in newer jax). The setting only concerns the CPU
    # client, so it is harmless on GPU hosts, and it must precede initialize, before any backend (and so the
    # platform) is known.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:
        pass
    # A failed join aborts the process from C++ (LOG(FATAL), a multi-line log), so a timer says it first, clearly.
    timer = threading.Timer(init_timeout, _join_timed_out, (coordinator_address, process_id, num_processes,
                                                           init_timeout))
    timer.daemon = True
    timer.start()
    # cluster_detection_method="deactivate": JAX's SLURM detection would otherwise pin each process to one GPU
    # (local_device_ids=[SLURM_LOCALID]). The JAX heartbeat timeout exceeds the watchdog's, whose line is clearer.
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
                               cluster_detection_method="deactivate", initialization_timeout=init_timeout + 10,
                               heartbeat_timeout_seconds=2 * peer_timeout + 10)
    timer.cancel()
    from jax._src import distributed  # the connected client: its key-value store carries the watchdog's heartbeats

    watchdog.start(distributed.global_state.client, jax.process_index(), jax.process_count(), coordinator_address,
                   peer_timeout)


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over every device of every process (or the given ones); fsdp=1 is pure data parallel."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if fsdp <= 0 or n % fsdp:
        valid = [f for f in range(1, n + 1) if n % f == 0]
        raise UserError(f"--fsdp={fsdp} does not divide the {n} devices; use one of {valid}")
    return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def _spec(logical: tuple, shape: tuple, rules: dict, mesh: Mesh) -> P:
    """PartitionSpec for a leaf: per dimension the first candidate that divides it; otherwise replicated."""
    spec, used = [], set()
    for name, size in zip(logical, shape):
        candidates = [tuple(a for a in axes if mesh.shape[a] > 1) for axes in rules.get(name, [])]
        fits = [axes for axes in candidates if axes and not used & set(axes)
                and size % int(np.prod([mesh.shape[a] for a in axes])) == 0]
        if fits:
            used |= set(fits[0])
            spec.append(fits[0] if len(fits[0]) > 1 else fits[0][0])
        else:
            spec.append(None)
    return P(*spec)


def _shardings(tree, rules: dict, mesh: Mesh, prefix: str = ""):
    """NamedShardings for a tree whose leaves follow the parameter paths (optimizer state mirrors them)."""
    def leaf(path, x):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        name = "/".join(str(k) for k in keys if isinstance(k, str))
        logical = next((axes for p, axes in PARAM_AXES.items() if name.endswith(p) and len(axes) == len(x.shape)),
                       (None,) * len(x.shape))
        return NamedSharding(mesh, _spec(logical, x.shape, rules, mesh))
    return jax.tree_util.tree_map_with_path(leaf, tree)


def param_shardings(params, mesh: Mesh):
    """How parameters live on the mesh (replicated, or FSDP-sharded over the model dimension)."""
    return _shardings(params, PARAM_RULES, mesh)


def optimizer_shardings(opt_state, mesh: Mesh):
    """How optimizer state (and gradients entering the update) live: ZeRO-2 over every device."""
    return _shardings(opt_state, OPTIMIZER_RULES, mesh)


def muon_stack_sharding(mesh: Mesh) -> NamedSharding | None:
    """Where Muon orthogonalises: its (zero-padded) stacks of whole matrices split over every device; None on one."""
    return NamedSharding(mesh, P(DATA_AXES)) if mesh.size > 1 else None


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Micro-batched tokens (accum, rows, T): rows split over every device."""
    return NamedSharding(mesh, P(None, DATA_AXES, None))


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Token rows (rows, T), e.g. validation batches: split over every device."""
    return NamedSharding(mesh, P(DATA_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
