"""The process group: rank environment, backend per device, collective timeout, and the
project's own collectives.

NCCL carries CUDA tensors only, so on GPU the process group maps CUDA tensors to NCCL
(DeepSpeed's collectives) and CPU tensors to gloo (ours: the per-step N check, metric sums,
object broadcasts, which stay on CPU and cost no device synchronisation). On CPU it is gloo alone.
"""

import datetime
import logging
import os

import deepspeed
import torch
import torch.distributed as dist

log = logging.getLogger("tokenflex")


def distributed_env():
    """(rank, world_size, local_rank) from torchrun's variables, else from srun's SLURM_* ones."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def process_group_backend(device_type, gpu_backend="nccl"):
    """torch's backend string: gloo on CPU; on GPU, gpu_backend for CUDA tensors and gloo for CPU
    ones. The tests pass gpu_backend="gloo" to build a GPU run's process group without a GPU."""
    return "gloo" if device_type == "cpu" else f"cpu:gloo,{device_type}:{gpu_backend}"


def init_process_group(timeout_minutes, backend=None):
    """The process group for this rank (see the module docstring), through DeepSpeed so that
    deepspeed.initialize uses it. A rank waiting longer than timeout_minutes in any collective fails."""
    _, world_size, local_rank = distributed_env()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = backend or process_group_backend(device_type)
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                               auto_mpi_discovery=False)
    log.info("process group: %d ranks, backend %s, collective timeout %g min", world_size, backend, timeout_minutes)


def sum_over_ranks(values):
    """Each value summed over all ranks (float64)."""
    totals = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(totals)
    return totals.tolist()


def max_over_ranks(values):
    """Each integer's maximum over all ranks."""
    highest = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    return highest.tolist()


def broadcast_from_rank0(value):
    """Rank 0's value (any picklable object) on every rank."""
    holder = [value]
    dist.broadcast_object_list(holder)
    return holder[0]
