"""Stage 2 (any start from a model folder) loads straight into ZeRO-3 partitions, as stage 1 does.

On 2 ranks (DeepSpeed ZeRO-3 on gloo, spawned processes): right after the stage builds the model,
before DeepSpeed's engine exists, every parameter of the vision tower and the LM is a ZeRO
parameter of which the rank holds only its half, and the gathered parameters equal the folder's
tensors, in fp32 and in bf16.
"""

import math
import os

import deepspeed
import pytest
import torch
import torch.multiprocessing as mp
from deepspeed.runtime.zero.utils import is_zero_param
from safetensors.torch import load_file

from pipeline.model.folder import weight_files
from pipeline.model.vlm import TokenFlexVLM
from pipeline.run.config import load_config
from stages import STAGES
from tests.distributed import REPO
from tools.demo import free_port

pytestmark = pytest.mark.timeout(600)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _worker(rank, port, folder, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    saved = {name: tensor for file in weight_files(folder) for name, tensor in load_file(file).items()}
    for precision, dtype in PRECISIONS.items():
        cfg = load_config(REPO / "configs" / "tiny_cpu_stage2.yaml",
                          [f"model.init_from={folder}", f"train.precision={precision}"])
        model = STAGES["finetune"].build_model(cfg)
        backbones = [p for part in (model.vision_tower, model.language_model) for p in part.parameters()]
        halves = all(is_zero_param(p) and p.ds_tensor.numel() == math.ceil(p.ds_numel / 2) for p in backbones)
        differ = []
        for name, parameter in model.named_parameters():
            with deepspeed.zero.GatheredParameters([parameter]):
                if not torch.equal(parameter.data, saved[name].to(dtype)):
                    differ.append(name)
        results[precision, rank] = {"partitioned halves": halves, "backbone parameters": len(backbones),
                                    "differ": differ, "dtypes": sorted({str(p.dtype) for p in backbones})}


def test_stage_2_loads_the_folder_into_zero3_partitions(tiny_models, tmp_path):
    torch.manual_seed(0)
    TokenFlexVLM.from_components(tiny_models / "vision", tiny_models / "qwen2").save_pretrained(tmp_path / "folder")
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), tmp_path / "folder", results), nprocs=2)
    for precision, dtype in PRECISIONS.items():
        for rank in (0, 1):
            result = results[precision, rank]
            assert result["partitioned halves"] and result["backbone parameters"] > 0, (precision, rank)
            assert result["dtypes"] == [str(dtype)], (precision, rank)
            assert result["differ"] == [], (precision, rank)
