"""Which tokens the loss supervises and how much each weighs.

Model folders carry this module as transformers remote code (see modeling_tokenflex.py).
"""

from typing import NamedTuple

import torch

from .chat import IGNORE_INDEX


def supervised_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, supervised): each position's next-token label and where one exists. The one
    definition of a supervised token, for the loss and for counting them."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


LOSS_REDUCTIONS = ("token", "square")


def supervised_weights(labels: torch.Tensor, position_ids: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Each supervised token's weight in the loss, in supervised_targets order (fp32).

    token: 1 each, the per-token mean. square (InternVL's loss_reduction "square", as in the
    TokenFLEX authors' code): 1/sqrt(its sample's supervised tokens), so a sample with n answer
    tokens weighs sqrt(n) in all, between the per-token mean (n) and the per-sample mean (1).
    Packed samples are told apart by their position ids restarting at 0; without position ids
    (padded rows) each row is one sample.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"train.loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {reduction!r}")
    _, supervised = supervised_targets(labels)
    if reduction == "token":
        return torch.ones(int(supervised.sum()), device=labels.device)
    rows, length = labels.shape
    row_offsets = torch.arange(rows, device=labels.device)[:, None] * (length + 1)
    starts = torch.zeros_like(labels) if position_ids is None else (position_ids == 0).long().cumsum(1)
    sample_of_target = (starts + row_offsets)[:, 1:][supervised]  # a target token belongs to the next position's sample
    _, sample, counts = torch.unique(sample_of_target, return_inverse=True, return_counts=True)
    return counts[sample].float().rsqrt()


class LossTargets(NamedTuple):
    """A batch's supervised tokens, in supervised_targets order: where each is predicted (an index
    into the batch's rows x length positions, flattened), its label, its weight in the loss, and
    the weights' sum."""

    positions: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    total_weight: float


def loss_targets(labels: torch.Tensor, position_ids: torch.Tensor | None, reduction: str) -> LossTargets:
    """The supervised tokens of (rows, L) labels, computed where the labels lie (on the host in
    training: boolean indexing on a device would wait for it)."""
    targets, supervised = supervised_targets(labels)
    rows, length = labels.shape
    positions = (torch.arange(rows, device=labels.device)[:, None] * length
                 + torch.arange(length - 1, device=labels.device)).masked_select(supervised)
    weights = supervised_weights(labels, position_ids, reduction)
    return LossTargets(positions, targets.masked_select(supervised), weights, float(weights.sum()))
