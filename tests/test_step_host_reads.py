"""The training step leaves the batch's layout on the host: on a GPU, reading a tensor that lies on
the device waits for the device, and a step that waits cannot queue the next kernels ahead.

One stage-2 step through pipeline.train.step.train_step on a real DeepSpeed ZeRO-3 engine (gloo, one
spawned rank), with a batch whose tensors record every copy made of them with .to(): the model
copies what the device computes with (input_ids, pixel_values, position_ids), and reads labels,
image_mask, image_grids and source_ids where the packer built them.
"""

import os

import deepspeed
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.engine.engine import build_engine
from pipeline.run.config import load_config
from pipeline.train.step import train_step
from stages import STAGES
from tests.distributed import REPO
from tests.test_step_loss import Batches, N, batch, build_model, make_rows
from tools.demo import free_port

pytestmark = pytest.mark.timeout(600)
DEVICE_KEYS = {"input_ids", "pixel_values", "position_ids"}


class Watched(torch.Tensor):
    """A batch tensor that records its name each time .to() copies it. Tensors computed from it are
    plain, but for its detached aliases: ZeRO-3 hands a module its inputs detached."""

    copied = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        key = getattr(args[0], "batch_key", None) if args else None
        if func is torch.Tensor.to and key:
            cls.copied.append(key)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        return watch(result, key) if func is torch.Tensor.detach and key else result


def watch(tensor: torch.Tensor, key: str) -> Watched:
    tensor = tensor.as_subclass(Watched)
    tensor.batch_key = key
    return tensor


def watched(tensors: dict) -> dict:
    return {key: watch(value, key) if isinstance(value, torch.Tensor) else value for key, value in tensors.items()}


def _worker(rank, port, tiny_models, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = load_config(REPO / "configs" / "tiny_cpu_stage2.yaml", ["data.rows_per_batch=2"])
    model = build_model(tiny_models)
    STAGES["finetune"].freeze_backbones(model, cfg)
    engine = build_engine(model, STAGES["finetune"].param_groups(model, cfg), cfg)
    rows = make_rows(model)[:2]
    micro_batch = batch(rows)
    micro_batch["image_grids"] = torch.ones(len(rows), 2, dtype=torch.long)
    loss, _ = train_step(engine, Batches([watched(micro_batch)]), N, grad_accum=1)
    results["copied"], results["loss"] = sorted(set(Watched.copied)), loss


def test_the_step_copies_only_what_the_device_computes_with(tiny_models):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), tiny_models, results), nprocs=1)
    assert results["loss"] > 0
    assert results["copied"] == sorted(DEVICE_KEYS)
