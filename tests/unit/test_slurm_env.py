"""Rank, local world size and head node from Slurm's variables, on uneven and multi-bracket layouts."""

from __future__ import annotations

import pytest

from bigbatch.launch.env import detect, first_host


def slurm_env(**extra) -> dict[str, str]:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[01-02]"}
    return {**env, **extra}


@pytest.mark.parametrize("nodelist,host", [
    ("node[01-02]-ib", "node01-ib"), ("rack[1-2]-node[01-04]", "rack1-node01"),
    ("n[3-5,9],m1", "n3"), ("gpu-a01", "gpu-a01"), ("a,b", "a"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("node,local_world", [(0, 3), (1, 3), (2, 2)])
def test_local_world_size_follows_this_nodes_entry_of_tasks_per_node(node, local_world):
    env = slurm_env(SLURM_TASKS_PER_NODE="3(x2),2", SLURM_NODEID=str(node), SLURM_PROCID="6",
                    SLURM_JOB_NODELIST="n[1-3]")
    info = detect(env)
    assert (info.source, info.world_size, info.rank, info.local_world_size) == ("slurm", 8, 6, local_world)


def test_step_variables_win_over_the_jobs():
    env = slurm_env(SLURM_TASKS_PER_NODE="4(x2)", SLURM_STEP_TASKS_PER_NODE="2,6", SLURM_NODEID="1",
                    SLURM_STEP_NODELIST="rack[2-3]-n[07-08]")
    info = detect(env)
    assert info.local_world_size == 6
    assert info.master_addr == "rack2-n07"  # no cluster knows this node: its name


def test_without_tasks_per_node_the_tasks_spread_evenly():
    assert detect(slurm_env(SLURM_NNODES="2")).local_world_size == 4


def test_node_id_beyond_the_task_list_is_an_error():
    with pytest.raises(ValueError, match="SLURM_NODEID=2"):
        detect(slurm_env(SLURM_TASKS_PER_NODE="4(x2)", SLURM_NODEID="2"))


@pytest.mark.parametrize("var", ["SLURM_HET_SIZE", "SLURM_PACK_SIZE", "SLURM_JOB_NUM_NODES_HET_GROUP_1"])
def test_heterogeneous_job_is_refused(var):
    with pytest.raises(ValueError, match=f"heterogeneous Slurm job \\({var} is set\\)"):
        detect(slurm_env(**{var: "2"}))


def test_group_zero_variables_of_an_ordinary_job_are_fine():
    # Slurm 22.05 sets these in every job (found on the local cluster).
    env = slurm_env(SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0="2(x2)", SLURM_JOB_NUM_NODES_HET_GROUP_0="2")
    assert detect(env).world_size == 8


def test_explicit_master_address_is_kept():
    env = slurm_env(SLURM_JOB_NODELIST="bad[", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    info = detect(env)
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 1234)


# ----------------------------------------------------------------------------- CPU threads per rank

def test_thread_share_ignores_the_launchers_omp_num_threads_but_not_the_users(monkeypatch):
    import torch

    from bigbatch.launch.env import OMP_FROM_USER, DistEnv, user_threads
    from bigbatch.launch.runtime import set_cpu_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    info = DistEnv(0, 2, 0, 2, "127.0.0.1", 29500, "torchrun")
    saved = torch.get_num_threads()
    try:
        for env, threads in (({"OMP_NUM_THREADS": "1", OMP_FROM_USER: "0"}, 4),  # set by bigbatch launch
                             ({"OMP_NUM_THREADS": "3", OMP_FROM_USER: "1"}, 3),  # the user's, via launch
                             ({"OMP_NUM_THREADS": "2"}, 2),                      # the user's, srun/mpirun
                             ({}, 4)):
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
            monkeypatch.delenv(OMP_FROM_USER, raising=False)
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            set_cpu_threads(info)
            assert torch.get_num_threads() == threads, env
    finally:
        torch.set_num_threads(saved)
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many'"):
        user_threads({"OMP_NUM_THREADS": "many"})


def test_a_local_rank_without_its_gpu_is_a_clear_error(monkeypatch):
    import torch

    from bigbatch.config import DistributedConfig
    from bigbatch.launch.runtime import distributed_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("bigbatch.launch.runtime.set_cpu_threads", lambda info: None)
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                       "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"local rank 3 has no GPU: this node shows 2 \(CUDA_VISIBLE_DEVICES=0,1\)"):
        with distributed_runtime(DistributedConfig(backend="nccl")):
            pass
