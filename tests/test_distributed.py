"""jaxchat.runtime.distributed's contract without starting a second process (tests/test_multiprocess.py does that):
where the coordinator is under SLURM, what a single process does, and the one-line errors for incomplete flags."""

import pytest

from jaxchat.runtime import distributed
from jaxchat.runtime.common import UserError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT", "SLURM_JOB_ID",
       "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NTASKS_PER_NODE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("nodes", ["node001", "node001,host2", "node[001-016],host2", "node[007,009-015]",
                                   "gpu-a[12-13]"])
def test_slurm_coordinator_is_where_jax_would_put_it(clean_env, nodes):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    for name, value in (("SLURM_STEP_NODELIST", nodes), ("SLURM_JOB_NODELIST", nodes), ("SLURM_JOB_ID", "123457")):
        clean_env.setenv(name, value)
    try:
        expected = SlurmCluster.get_coordinator_address(None, None)
    except TypeError:  # jax versions whose signature has no port override
        expected = SlurmCluster.get_coordinator_address(None)
    assert distributed._slurm_coordinator() == expected
    clean_env.setenv("JAX_COORDINATOR_PORT", "4321")
    assert distributed._slurm_coordinator() == expected.rsplit(":", 1)[0] + ":4321"


def test_one_process_is_a_no_op(clean_env):
    distributed.init_distributed()
    distributed.init_distributed(num_processes=1)
    clean_env.setenv("SLURM_JOB_ID", "1")
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job
    distributed.init_distributed()
    import jax
    assert jax.process_count() == 1


def test_incomplete_multi_process_flags_are_one_line(clean_env):
    with pytest.raises(UserError, match="2 processes need --coordinator-address=HOST:PORT"):
        distributed.init_distributed(num_processes=2, process_id=0)
    with pytest.raises(UserError, match="need --coordinator-address"):
        distributed.init_distributed("127.0.0.1:1", 2)  # no process id
    with pytest.raises(UserError, match=r"--process-id=2 must be in 0\.\.1"):
        distributed.init_distributed("127.0.0.1:1", 2, 2)
    clean_env.setenv("JAX_NUM_PROCESSES", "3")  # the environment counts as much as the flags
    clean_env.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(UserError, match=r"--process-id=5 must be in 0\.\.2"):
        distributed.init_distributed("127.0.0.1:1")


def test_a_tpu_vm_joins_its_slice_by_jaxs_own_detection(clean_env):
    """On a Cloud TPU VM, with no process count given, every host calls jax.distributed.initialize() without a
    coordinator (JAX reads the slice from the TPU VM's metadata); a count given wins; off a TPU VM nothing is called."""
    import jax
    from jax._src import cloud_tpu_init

    calls = []
    clean_env.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    distributed.init_distributed()
    assert calls == []  # this machine is no TPU VM
    clean_env.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    distributed.init_distributed(num_processes=1)
    assert calls == []  # told: one process
    distributed.init_distributed()
    assert len(calls) == 1 and calls[0][0] == () and "coordinator_address" not in calls[0][1]


def test_gather_json_in_one_process():
    assert distributed.gather_json({"pq_idx": 3, "rows": [1, 2]}) == [{"pq_idx": 3, "rows": [1, 2]}]
