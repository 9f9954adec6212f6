"""What every stage shares: setting and reporting which parameters train, and where activations are
recomputed (train.gradient_checkpointing)."""

import logging

from pipeline.engine.engine import numel
from pipeline.model.vlm import TokenFlexVLM

log = logging.getLogger("tokenflex")


def set_trainable(model, trainable_parts):
    """Freeze everything, then unfreeze the named top-level parts; log groups and counts."""
    for name, part in model.named_children():
        part.requires_grad_(name in trainable_parts)
    for name, part in model.named_children():
        count = sum(numel(p) for p in part.parameters())
        state = "TRAINS" if name in trainable_parts else "frozen"
        log.info("  %-16s %-6s %12s parameters", name, state, f"{count:,}")
    total = sum(numel(p) for p in model.parameters() if p.requires_grad)
    log.info("  trainable total  %19s parameters", f"{total:,}")


def group(parameters, lr, weight_decay):
    """An optimizer group; norms and biases get no weight decay, as in LLaVA's trainer."""
    decay = [p for p in parameters if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in parameters if p.requires_grad and p.ndim < 2]
    return [{"params": ps, "lr": lr, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]


def enable_gradient_checkpointing(model: TokenFlexVLM) -> None:
    """Recompute activations in backward wherever gradients flow: always the LM (the projector's
    gradient passes through it even when frozen), the tower only when it trains. Reentrant
    checkpointing, because the non-reentrant kind trips over ZeRO-3's parameter gathering."""
    tower_trains = any(p.requires_grad for p in model.vision_tower.parameters())
    parts = [model.language_model] + [model.vision_tower] * tower_trains
    for part in parts:
        part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    log.info("gradient checkpointing on: %s", ", ".join(type(part).__name__ for part in parts))
