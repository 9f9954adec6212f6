"""The process group: rank environment, backend per device, collective timeout, and the
project's own collectives.

NCCL carries CUDA tensors only, so on GPU the process group maps CUDA tensors to NCCL
(DeepSpeed's collectives) and CPU tensors to gloo (ours: the per-step N check, metric sums,
object broadcasts, which stay on CPU and cost no device synchronisation). On CPU it is gloo alone.
"""

import datetime
import logging
import os
import socket
from typing import TypeVar

import deepspeed
import psutil
import torch
import torch.distributed as dist

log = logging.getLogger("tokenflex")
T = TypeVar("T")


def distributed_env() -> tuple[int, int, int]:
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


def process_group_backend(device_type: str, gpu_backend: str = "nccl") -> str:
    """torch's backend string: gloo on CPU; on GPU, gpu_backend for CUDA tensors and gloo for CPU
    ones. The tests pass gpu_backend="gloo" to build a GPU run's process group without a GPU."""
    return "gloo" if device_type == "cpu" else f"cpu:gloo,{device_type}:{gpu_backend}"


def task_gpu(local_rank: int, visible_gpus: int) -> int:
    """The index, among the GPUs this task sees, of the one it trains on: its local rank when it
    sees all of its node's GPUs (torchrun; srun with --gpus-per-node), the one it sees when Slurm
    binds a GPU per task (--gpus-per-task=1, --gpu-bind=single:1), whatever its local rank."""
    if visible_gpus == 1:
        return 0
    if 0 <= local_rank < visible_gpus:
        return local_rank
    raise ValueError(
        f"local rank {local_rank}, but this task sees {visible_gpus} GPU(s) (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run one task per GPU, each seeing either all of its "
        f"node's GPUs or only its own (srun --gpus-per-task=1)")


def bind_task_gpu(visible_gpus: int) -> int:
    """Make this process use its GPU (task_gpu) and return the index. DeepSpeed takes LOCAL_RANK
    for the device index (the process group's device_id, zero.Init, the engine), so under a
    per-task binding LOCAL_RANK becomes that index too."""
    index = task_gpu(int(os.environ["LOCAL_RANK"]), visible_gpus)
    os.environ["LOCAL_RANK"] = str(index)
    return index


def socket_interfaces(backend: str) -> dict[str, str]:
    """The network interface each backend's TCP traffic takes, as far as can be told before it
    connects: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME when set; unset, torch's gloo binds to the
    address the host name resolves to (loopback when it resolves to none), and NCCL picks one
    itself (NCCL_DEBUG=INFO names it)."""
    interfaces = {}
    if "gloo" in backend:
        chosen = os.environ.get("GLOO_SOCKET_IFNAME")
        interfaces["gloo"] = (
            f"{chosen} (GLOO_SOCKET_IFNAME)" if chosen else f"{resolved_interface()}, GLOO_SOCKET_IFNAME unset"
        )
    if "nccl" in backend:
        chosen = os.environ.get("NCCL_SOCKET_IFNAME")
        interfaces["nccl"] = (
            f"{chosen} (NCCL_SOCKET_IFNAME)" if chosen else "NCCL's own choice, NCCL_SOCKET_IFNAME unset"
        )
    return interfaces


def resolved_interface() -> str:
    """The interface holding the address this host's name resolves to."""
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return f"loopback (host name {host} resolves to no address)"
    interface = next((name for name, addresses in psutil.net_if_addrs().items()
                      if any(a.address == address for a in addresses)), "none of this host's interfaces")
    return f"{interface} ({address}, what host name {host} resolves to)"


def init_process_group(timeout_minutes: float, backend: str | None = None) -> None:
    """The process group for this rank (see the module docstring), through DeepSpeed so that
    deepspeed.initialize uses it. A rank waiting longer than timeout_minutes in any collective fails."""
    _, world_size, local_rank = distributed_env()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        index = bind_task_gpu(torch.cuda.device_count())
        torch.cuda.set_device(index)
        log.info("local rank %d trains on GPU %d of the %d it sees (CUDA_VISIBLE_DEVICES=%s)", local_rank, index,
                 torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    backend = backend or process_group_backend(device_type)
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                               auto_mpi_discovery=False)
    log.info("process group: %d ranks, backend %s, collective timeout %g min", world_size, backend, timeout_minutes)
    for name, interface in socket_interfaces(backend).items():
        log.info("%s network interface: %s", name, interface)


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each value summed over all ranks (float64)."""
    totals = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(totals)
    return totals.tolist()


def max_over_ranks(values: list[int]) -> list[int]:
    """Each integer's maximum over all ranks."""
    highest = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    return highest.tolist()


def broadcast_from_rank0(value: T) -> T:
    """Rank 0's value (any picklable object) on every rank."""
    holder = [value]
    dist.broadcast_object_list(holder)
    return holder[0]
