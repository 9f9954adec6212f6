"""DeepSpeed set-up: the engine, its config, its dtypes and where its tensors lie, the LR schedule.
The process group is pipeline/train/distributed.py's; loading into ZeRO-3 partitions, zero3.py's.
"""

import json
import logging
import math
import os
from collections.abc import Callable, Iterable

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.utils import is_zero_param

from pipeline.run.config import Config

log = logging.getLogger("tokenflex")


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def training_dtype(precision: str) -> torch.dtype:
    """The dtype of the weights the engine computes with (fp32 master weights aside)."""
    return torch.bfloat16 if use_bf16(precision) else torch.float32


def deepspeed_config(cfg: Config, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON named by train.deepspeed, with its "auto" values filled from our config.

    load_universal: the checkpoint to resume is a universal one (written for another world size)."""
    with open(cfg.train.deepspeed) as handle:
        ds = json.load(handle)
    filled = {
        "train_micro_batch_size_per_gpu": cfg.data.rows_per_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") != "auto" and ds[key] != value:
            raise ValueError(
                f'{cfg.train.deepspeed}: {key}={ds[key]} disagrees with the run config ({value}); use "auto"'
            )
        ds[key] = value
    ds["bf16"] = {"enabled": use_bf16(cfg.train.precision)}
    # Without it DeepSpeed sums micro-batch gradients in the model dtype: bf16 under bf16.
    ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    world_size = int(os.environ["WORLD_SIZE"])
    ds["train_batch_size"] = cfg.data.rows_per_batch * cfg.train.grad_accum * world_size
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def warmup_cosine(max_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup, then cosine decay to min_lr_ratio."""
    warmup = math.ceil(max_steps * warmup_ratio)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every parameter in the training dtype before DeepSpeed takes the model. DeepSpeed casts
    them itself, except when some were created by zero.Init (stage 1's tower and LM under ZeRO-3,
    already in the run's dtype): it then casts none, and a part built outside zero.Init (the
    projector) would stay fp32 beside bf16 weights."""
    for parameter in model.parameters():
        if not is_zero_param(parameter) and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)


def place_on_device(model: torch.nn.Module, device: torch.device) -> None:
    """Every buffer, and every parameter ZeRO-3 does not hold yet, on device. DeepSpeed moves the
    whole module itself, except when zero.Init built some of it (stage 1's tower and LM, stage 2's
    whole model): it then leaves placement to zero.Init, which moves only the parameters it
    partitions, so a buffer registered outside it (the pixel table) would stay on the CPU."""
    for tensor in [*model.buffers(), *(p for p in model.parameters() if not is_zero_param(p))]:
        tensor.data = tensor.data.to(device)


def misplaced(engine: deepspeed.DeepSpeedEngine) -> list[str]:
    """Names of the module's buffers and parameters (what this rank holds of them) off the engine's
    device; ZeRO's parameter partitions are exempt when its config offloads them."""
    tensors = list(engine.module.named_buffers())
    if not engine.zero_offload_param():
        tensors += [(name, held(p)) for name, p in engine.module.named_parameters()]
    return [name for name, tensor in tensors if tensor.device != engine.device]


def held(parameter: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of a parameter: its partition under ZeRO-3."""
    return getattr(parameter, "ds_tensor", parameter)


def master_weights(engine: deepspeed.DeepSpeedEngine) -> list[torch.Tensor]:
    """The partitions the optimizer steps (fp32 master weights under bf16): ZeRO-3's, or ZeRO-2's."""
    if engine.zero_optimization_partition_weights():
        return engine.optimizer.fp32_partitioned_groups_flat
    return engine.optimizer.single_partition_of_fp32_groups


def log_dtypes(engine: deepspeed.DeepSpeedEngine, precision: str) -> None:
    """Once at start-up: the dtype of each part's weights, of the optimizer's master weights and
    of the gradient accumulation, as the engine holds them."""
    log.info("dtypes (train.precision=%s):", precision)
    for name, part in engine.module.named_children():
        state = "trains" if any(p.requires_grad for p in part.parameters()) else "frozen"
        log.info("  %-16s %-6s weights %s", name, state, dtype_names(held(p).dtype for p in part.parameters()))
    log.info("  optimizer        master weights %s, gradients accumulated in %s",
             dtype_names(m.dtype for m in master_weights(engine)), dtype_names([engine.get_data_types()[1]]))


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(sorted({str(dtype).removeprefix("torch.") for dtype in dtypes}))


def build_engine(model: torch.nn.Module, param_groups: list[dict], cfg: Config,
                 load_universal: bool = False) -> deepspeed.DeepSpeedEngine:
    """ZeRO-3 (or 2) engine with a plain torch AdamW: no fused-kernel compile on first use."""
    cast_parameters(model, training_dtype(cfg.train.precision))
    place_on_device(model, torch.device(get_accelerator().current_device_name()))
    optimizer = torch.optim.AdamW(param_groups, betas=tuple(cfg.optim.betas))
    schedule = warmup_cosine(cfg.train.max_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    elsewhere = misplaced(engine)
    if elsewhere:
        raise RuntimeError(f"{len(elsewhere)} tensors are not on the engine's device {engine.device}: {elsewhere[:5]}")
    log_dtypes(engine, cfg.train.precision)
    return engine


def numel(parameter: torch.nn.Parameter) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it away (numel() is then 0)."""
    return getattr(parameter, "ds_numel", parameter.numel())

