"""A packed batch from the samples chosen for its rows (pipeline/data/packing.py chooses them):
rows_per_batch rows of exactly seq_len tokens, each row's samples end to end with their image
markers expanded to their slots at the step's N, and the tile budget's pixels, real tiles first.
For a given N every rank's batch has the same shapes: ZeRO-3 ranks must run the same collectives.
"""

from collections.abc import Sequence

import torch

from pipeline.model.batch import Batch
from pipeline.model.chat import IGNORE_INDEX, expand_image_markers
from pipeline.model.tiles import image_slots


class PackedBatch(Batch):
    """A training batch: the forward's tensors (source_ids included) and the batch's stats (counts
    and running totals; "samples": (source, shard, key, epoch) of each packed sample)."""

    stats: dict


def slots_of(sample: dict, num_vision_tokens: int) -> list[int]:
    """Each of the sample's images' slots at N (pipeline/model/tiles.py)."""
    return [image_slots(grid, num_vision_tokens) for grid in sample["image_grids"]]


def tiles_of(sample: dict) -> int:
    """Tiles the vision tower encodes for the sample."""
    return 0 if sample["pixel_values"] is None else len(sample["pixel_values"])


def assemble(rows: Sequence[Sequence[dict]], num_vision_tokens: int, seq_len: int, tile_budget: int,
             pixel_shape: tuple[int, int, int], pad_token_id: int, image_token_id: int) -> tuple[Batch, int, int]:
    """(the batch, how many samples were cut to their row's length, the rows' real tokens).

    rows: each row's samples (decoded: input_ids, labels, pixel_values, image_grids, source), in
    order. A row's padding tail is a sequence of its own (its position ids restart), so real
    tokens never attend to it. What the device computes with is built in pinned memory where CUDA
    exists, so that its copy to the device need not wait (TokenFlexVLM.forward).
    """
    pinned = torch.cuda.is_available()
    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long, pin_memory=pinned)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long, pin_memory=pinned)
    source_ids = torch.full(shape, -1, dtype=torch.long)
    pixels = torch.zeros((tile_budget, *pixel_shape), dtype=torch.uint8, pin_memory=pinned)
    image_mask = torch.zeros(tile_budget, dtype=torch.bool)
    grids, num_tiles, truncated, real_tokens = [], 0, 0, 0
    for row, samples in enumerate(rows):
        used = 0
        for sample in samples:
            ids, labs = expand_image_markers(sample["input_ids"], sample["labels"], image_token_id,
                                             slots_of(sample, num_vision_tokens))
            if len(ids) > seq_len:
                ids, labs = ids[:seq_len], labs[:seq_len]
                truncated += 1
            end = used + len(ids)
            input_ids[row, used:end] = torch.tensor(ids)
            labels[row, used:end] = torch.tensor(labs)
            position_ids[row, used:end] = torch.arange(len(ids))
            source_ids[row, used:end] = sample["source"]
            tiles = tiles_of(sample)
            if tiles:
                pixels[num_tiles:num_tiles + tiles] = sample["pixel_values"]
                image_mask[num_tiles:num_tiles + tiles] = True
                num_tiles += tiles
                grids += sample["image_grids"]
            used = end
        real_tokens += used
        position_ids[row, used:] = torch.arange(seq_len - used)
    batch = Batch(input_ids=input_ids, labels=labels, position_ids=position_ids, source_ids=source_ids,
                  pixel_values=pixels, image_mask=image_mask,
                  image_grids=torch.tensor(grids, dtype=torch.long).view(-1, 2))
    return batch, truncated, real_tokens
