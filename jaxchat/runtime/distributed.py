"""Multi-process start-up: join JAX's distributed runtime (flags, JAX environment variables or SLURM), start the
peer watchdog, and gather small JSON records from every process.

nanochat starts its processes with torchrun and joins them in nanochat/common.py compute_init (at 348fbb3); here
each process is started on its own (by hand, by SLURM or by launch/slurm.sh) and joins a coordinator.
"""

import json
import os
import socket
import sys
import threading

import jax
import numpy as np

from jaxchat.runtime.common import UserError


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
    (coordinator: the first node of the step), then on a Cloud TPU VM the slice itself (JAX reads its hosts from the
    TPU VM's metadata). Each process sees all of its host's devices, except under SLURM with several tasks per node,
    where task SLURM_LOCALID gets that one GPU.
    """
    from jaxchat.runtime import watchdog

    if watchdog.active():
        return
    slurm = "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes or _env_int("JAX_NUM_PROCESSES") or (_env_int("SLURM_NTASKS") if slurm else None)
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if process_id is None and slurm:
        process_id = _env_int("SLURM_PROCID")
    if not num_processes and on_tpu_vm():
        return _join_tpu_slice(init_timeout, peer_timeout)
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


def on_tpu_vm() -> bool:
    """Whether this host is a Cloud TPU VM with its chips: JAX decides it when it is imported (libtpu installed, TPU
    chips on the PCI bus), before any backend starts."""
    from jax._src import cloud_tpu_init
    return cloud_tpu_init.running_in_cloud_tpu_vm


def _join_tpu_slice(init_timeout: int, peer_timeout: int) -> None:
    """Every host of a TPU slice runs the same command (launch/tpu_vm.sh): jax.distributed.initialize() without
    arguments finds the slice's hosts, this one's id and the coordinator (worker 0) in the TPU VM's metadata; a
    one-host slice is one process, as without it."""
    from jax._src import distributed

    from jaxchat.runtime import watchdog

    jax.distributed.initialize(initialization_timeout=init_timeout, heartbeat_timeout_seconds=2 * peer_timeout + 10)
    if jax.process_count() > 1:
        watchdog.start(distributed.global_state.client, jax.process_index(), jax.process_count(),
                       distributed.global_state.coordinator_address, peer_timeout)


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
