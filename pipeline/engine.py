"""DeepSpeed set-up: the engine, its config, the schedule (the process group: pipeline/distributed.py)."""

import contextlib
import json
import logging
import math
import os

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import (
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)

log = logging.getLogger("tokenflex")


def use_bf16(precision):
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg, load_universal=False):
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
            raise ValueError(f"{cfg.train.deepspeed}: {key}={ds[key]} disagrees with the run config ({value}); use \"auto\"")
        ds[key] = value
    ds["bf16"] = {"enabled": use_bf16(cfg.train.precision)}
    world_size = int(os.environ["WORLD_SIZE"])
    ds["train_batch_size"] = cfg.data.rows_per_batch * cfg.train.grad_accum * world_size
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


@contextlib.contextmanager
def zero3_loading(cfg):
    """Under ZeRO-3, make transformers' from_pretrained partition weights as it loads them
    (its HfDeepSpeedConfig hook), so no rank ever holds a whole HF checkpoint."""
    ds = deepspeed_config(cfg)
    if ds.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    hf_config = HfDeepSpeedConfig(ds)  # transformers holds it only weakly
    set_hf_deepspeed_config(hf_config)
    log.info("ZeRO-3: checkpoints load straight into partitioned parameters")
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def warmup_cosine(max_steps, warmup_ratio, min_lr_ratio):
    """LR multiplier per optimizer step: linear warmup, then cosine decay to min_lr_ratio."""
    warmup = math.ceil(max_steps * warmup_ratio)

    def multiplier(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def build_engine(model, param_groups, cfg, load_universal=False):
    """ZeRO-3 (or 2) engine with a plain torch AdamW: no fused-kernel compile on first use."""
    optimizer = torch.optim.AdamW(param_groups, betas=tuple(cfg.optim.betas))
    schedule = warmup_cosine(cfg.train.max_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine


def numel(parameter):
    """Full size of a parameter, also when ZeRO-3 has partitioned it away (numel() is then 0)."""
    return getattr(parameter, "ds_numel", parameter.numel())

