"""The process group and the project's collectives, on 2 spawned CPU processes.

A GPU run's process group sends CUDA tensors to NCCL, which can't carry CPU tensors. Here NCCL
is emulated by gloo restricted to the cuda device type ("cuda:gloo"): a process group built the
way a GPU run builds it must run every collective of the project (they all use CPU tensors).
"""

import os
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.train.distributed import (
    bind_task_gpu,
    broadcast_from_rank0,
    distributed_env,
    init_process_group,
    max_over_ranks,
    process_group_backend,
    socket_interfaces,
    sum_over_ranks,
)
from pipeline.train.sampler import check_same_across_ranks
from tools.demo import free_port

GPU_RUN_BACKEND = process_group_backend("cuda", gpu_backend="gloo")  # what a GPU run gets, NCCL emulated


def spawn(worker, *args):
    """Run worker(rank, results, *args) on 2 processes; returns {rank: what it put in results}."""
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), results, *args), nprocs=2)
    return dict(results)


def join(rank, port, backend, timeout_minutes=1.0, **env):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", **env)
    init_process_group(timeout_minutes, backend=backend)


def _project_collectives(rank, port, results, backend):
    join(rank, port, backend, GLOO_SOCKET_IFNAME="lo")  # as on a cluster that names its interface
    try:
        results[rank] = {
            "sum": sum_over_ranks([1.5, rank]),
            "max": max_over_ranks([rank, -rank]),
            "broadcast": broadcast_from_rank0(f"wandb-id-of-rank-{rank}"),
            "stop": check_same_across_ranks(144, stop_requested=rank == 1),
        }
        dist.barrier()
    except RuntimeError as error:
        results[rank] = str(error)
    dist.destroy_process_group()


def test_a_gpu_runs_process_group_carries_the_projects_collectives():
    assert GPU_RUN_BACKEND == "cpu:gloo,cuda:gloo"
    expected = {"sum": [3.0, 1.0], "max": [1, 0], "broadcast": "wandb-id-of-rank-0", "stop": True}
    assert spawn(_project_collectives, GPU_RUN_BACKEND) == {0: expected, 1: expected}


def test_a_cuda_only_process_group_rejects_them():
    """The failure the test above guards against: what dist_backend="nccl" alone gives a GPU run."""
    results = spawn(_project_collectives, "cuda:gloo")
    assert all("No backend type associated with device type cpu" in results[rank] for rank in (0, 1)), results


def _stalled_peer(rank, port, results, timeout_minutes):
    join(rank, port, "gloo", timeout_minutes)
    if rank == 1:  # alive but never joins the collective, as a hung rank
        deadline = time.time() + 60
        while 0 not in results and time.time() < deadline:
            time.sleep(0.1)
        return
    started = time.perf_counter()
    try:
        sum_over_ranks([1.0])
        results[rank] = "returned"
    except RuntimeError:
        results[rank] = time.perf_counter() - started


def test_collective_timeout_comes_from_the_config():
    waited = spawn(_stalled_peer, 0.05)[0]  # 3 s
    assert waited != "returned" and 2 < waited < 20, waited


def test_rank_environment_comes_from_srun_when_torchrun_set_none(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so the teardown also removes what distributed_env sets
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert distributed_env() == (5, 8, 1)


@pytest.mark.parametrize("device_type, backend", [("cpu", "gloo"), ("cuda", "cpu:gloo,cuda:nccl")])
def test_backend_per_device(device_type, backend):
    assert process_group_backend(device_type) == backend


# ---- the GPU each task trains on, in the environments Slurm and torchrun give it ----

SEES_ALL = "0,1,2,3,4,5,6,7"


@pytest.mark.parametrize("local_rank, visible, index", [
    ("3", SEES_ALL, 3),  # torchrun, or srun --gpus-per-node=8: every task sees the node's GPUs
    ("3", "3", 0),  # srun --gpus-per-task=1 / --gpu-bind=single:1: one GPU per task
    ("3", "0", 0),  # the same with Slurm's device cgroup, which renumbers the task's one GPU to 0
    ("0", "5", 0),
], ids=["all-visible", "per-task", "per-task-cgroup", "per-task-rank0"])
def test_each_task_trains_on_its_own_gpu_and_deepspeed_is_told(monkeypatch, local_rank, visible, index):
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert bind_task_gpu(visible_gpus=len(visible.split(","))) == index
    assert os.environ["LOCAL_RANK"] == str(index)  # DeepSpeed's device index (process group, zero.Init, engine)


def test_a_task_seeing_too_few_gpus_for_its_local_rank_is_an_error(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match=r"local rank 3, but this task sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=0,1\)"):
        bind_task_gpu(visible_gpus=2)


def test_socket_interfaces_name_the_variables_or_what_each_backend_falls_back_to(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    unset = socket_interfaces(process_group_backend("cuda"))
    assert unset["gloo"].endswith("GLOO_SOCKET_IFNAME unset") and "what host name" in unset["gloo"]
    assert unset["nccl"] == "NCCL's own choice, NCCL_SOCKET_IFNAME unset"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib1")
    assert socket_interfaces(process_group_backend("cuda")) == {"gloo": "ib0 (GLOO_SOCKET_IFNAME)",
                                                                "nccl": "ib1 (NCCL_SOCKET_IFNAME)"}
    assert socket_interfaces(process_group_backend("cpu")) == {"gloo": "ib0 (GLOO_SOCKET_IFNAME)"}
