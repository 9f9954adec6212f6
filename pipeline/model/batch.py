"""What a forward takes: a batch of rows of samples and their images' tiles, as training packs it
(pipeline/data/batches.py) and inference pads it (inputs.py).

Model folders carry this module as transformers remote code (see modeling_tokenflex.py).
"""

from typing import TypedDict

import torch


class _Rows(TypedDict):
    input_ids: torch.Tensor  # (rows, L) token ids, each image marker expanded to its image's slots
    pixel_values: torch.Tensor  # (tiles, 3, H, W) uint8, the real tiles first, then dummies
    image_mask: torch.Tensor  # (tiles,) bool: which tiles are real


class Batch(_Rows, total=False):
    """TokenFlexVLM.forward's batch. Tensors may lie on the host: the model copies what its device
    computes with and reads the rest where it lies (see TokenFlexVLM.forward)."""

    labels: torch.Tensor  # (rows, L) the next token to predict at each position, IGNORE_INDEX where none
    position_ids: torch.Tensor  # (rows, L) restarting at 0 for each packed sample and for padding
    attention_mask: torch.Tensor  # (rows, L) 1 on the tokens of padded rows (inference), instead of position_ids
    image_grids: torch.Tensor  # (images, 2) each real image's (rows, cols) of tiles; absent: one tile each
    source_ids: torch.Tensor  # (rows, L) each token's mixture source, -1 on padding (training's, for metrics)
