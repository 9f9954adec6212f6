"""High-resolution images as tiles at the vision tower's input size, video frames beside them, and
where tiles and frames sit in the text.

Model folders carry this module as transformers remote code (see pipeline/model/vlm.py).

The grid (InternVL's dynamic-resolution rule): among every grid of `cols x rows` tiles with
1 <= cols x rows <= max_tiles, take the one whose aspect ratio cols / rows is closest to the
image's width / height; between grids of equally close ratio, the larger one wins only when the
image has more than half the pixels of that grid's tiles (a small image is not blown up). The
image is resized (stretched, without padding) to cols x rows tiles of the tower's input size and
cut row by row. A grid of more than one tile is followed by a thumbnail: the whole image as one
tile, prepared as a single-tile image is (data.image_aspect). A 1 x 1 grid is the image as it
was before tiles existed: one tile, no thumbnail.

Every tile is pooled to the step's N vision tokens. An image's slots in the text, in order: each
row of its grid (cols x N slots, then one slot holding a learned row-end embedding, as
LLaVA-NeXT's image_newline marks rows), then the thumbnail's N slots. So the LM can tell the grid
from the row ends, and the thumbnail from the slots after the last row end. A 1 x 1 grid takes N
slots, nothing more.

A video's sampled frames (video.py) are never tiled: each is one tower input, prepared as a
single-tile image is, and one marker of its own (chat.py: frames_as_markers), flagged in the
sample's frame_mask (one flag per tower input). A frame is pooled to the step's frame count M
(tokens.frame_counts; images keep N) and takes M slots followed by one slot holding a learned
frame-end embedding: the LM's positions already order the slots, and the frame end tells it where
each frame stops, whatever M is, at one slot per frame (text timestamps, as InternVL writes
them, would cost a few tokens a frame and depend on the tokenizer). It trains with the projector,
as the row end does.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

from .images import resize_rgb, rgb_pixels, tower_pixels, tower_size

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor


def candidate_grids(max_tiles: int) -> list[tuple[int, int]]:
    """(rows, cols) of every grid of at most max_tiles tiles, fewest tiles first."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    grids = {(rows, cols) for rows in range(1, max_tiles + 1) for cols in range(1, max_tiles // rows + 1)}
    return sorted(grids, key=lambda grid: (grid[0] * grid[1], grid))


def choose_grid(width: int, height: int, max_tiles: int, tile_side: int) -> tuple[int, int]:
    """(rows, cols): the grid whose aspect ratio is closest to width / height (see the module docstring)."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for rows, cols in candidate_grids(max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (rows, cols), diff
        elif diff == best_diff and width * height > 0.5 * tile_side * tile_side * rows * cols:
            best = (rows, cols)
    return best


def tile_count(grid: Sequence[int]) -> int:
    """Tiles the tower encodes for an image with this grid: the grid's, plus a thumbnail when there are several."""
    tiles = grid[0] * grid[1]
    return tiles + (tiles > 1)


def image_slots(grid: Sequence[int], num_vision_tokens: int) -> int:
    """Text slots of one image at N: N per tile, plus a row end per grid row when there are several tiles."""
    rows, cols = grid
    return num_vision_tokens if rows * cols == 1 else tile_count(grid) * num_vision_tokens + rows


def frame_slots(num_frame_tokens: int) -> int:
    """Text slots of one video frame at M: its M pooled tokens and its frame end."""
    return num_frame_tokens + 1


def frame_markers(grids: Sequence[Sequence[int]], frame_mask: Sequence[bool] | torch.Tensor | None) -> list[bool]:
    """Which markers are video frames, in order. grids: each image's or frame's grid; frame_mask:
    which of their tower inputs are frames (None: none), read where it lies (the host in training)."""
    flags = [] if frame_mask is None else [bool(f) for f in frame_mask]
    frames, tile = [], 0
    for grid in grids:
        frames.append(tile < len(flags) and flags[tile])
        tile += tile_count(grid)
    return frames


def marker_slots(grids: Sequence[Sequence[int]], frame_mask: Sequence[bool] | torch.Tensor | None,
                 num_vision_tokens: int, num_frame_tokens: int | None = None) -> list[int]:
    """Each marker's slots, in order: an image's at N (image_slots), a frame's at M (frame_slots;
    M None: N). grids, frame_mask: see frame_markers."""
    frame = frame_slots(num_vision_tokens if num_frame_tokens is None else num_frame_tokens)
    return [frame if is_frame else image_slots(grid, num_vision_tokens)
            for grid, is_frame in zip(grids, frame_markers(grids, frame_mask))]


def count_within_budget(grids: Sequence[Sequence[int]], frame_mask: Sequence[bool] | torch.Tensor | None,
                        budget: int, grid_side: int) -> int:
    """The largest square N = n * n (n at most grid_side, the tower's patch grid) at which a prompt's
    images and frames, all pooled to N, take at most `budget` slots in all (marker_slots: N per tile
    plus row ends, N per frame plus a frame end); 1 when even N = 1 takes more."""
    fits = [n for n in range(1, grid_side + 1) if sum(marker_slots(grids, frame_mask, n * n)) <= budget]
    return max(fits, default=1) ** 2


def largest_image_slots(max_tiles: int, num_vision_tokens: int) -> int:
    """Slots of the largest image max_tiles allows, at N."""
    return max(image_slots(grid, num_vision_tokens) for grid in candidate_grids(max_tiles))


def tiles_allowed(max_tiles: int, multi_image_max_tiles: int, num_images: int) -> int:
    """The tile limit for each image of a sample with num_images images: max_tiles for a lone
    image, at most multi_image_max_tiles when a sample has several."""
    return max_tiles if num_images <= 1 else min(max_tiles, multi_image_max_tiles)


def image_tiles(rgb: torch.Tensor, image_processor: "BaseImageProcessor", max_tiles: int, aspect: str | None = None
                ) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> ((tiles, 3, height, width) uint8 at the tower's input size, grid (rows, cols))."""
    height, width = tower_size(image_processor)
    grid = choose_grid(rgb.shape[1], rgb.shape[0], max_tiles, width)
    rows, cols = grid
    thumbnail = tower_pixels(rgb, image_processor, aspect).unsqueeze(0)
    if rows * cols == 1:
        return thumbnail, grid
    whole = resize_rgb(rgb, rows * height, cols * width, image_processor)
    tiles = whole.view(3, rows, height, cols, width).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, height, width)
    return torch.cat([tiles, thumbnail]), grid


def set_tiling(image_processor: "BaseImageProcessor", max_tiles: int, multi_image_max_tiles: int) -> None:
    """Record data.max_tiles and data.multi_image_max_tiles on the image processor: model folders
    save them with it (preprocessor_config.json), so evaluation, generation and remote code cut
    images into tiles as training did."""
    image_processor.max_tiles, image_processor.multi_image_max_tiles = max_tiles, multi_image_max_tiles


def recorded_tiling(image_processor: "BaseImageProcessor", max_tiles: int | None = None,
                    multi_image_max_tiles: int | None = None) -> tuple[int, int]:
    """(max_tiles, multi_image_max_tiles): the given ones, else the processor's recorded ones
    (1 for folders written before tiles: one tile per image)."""
    return (max_tiles or getattr(image_processor, "max_tiles", 1),
            multi_image_max_tiles or getattr(image_processor, "multi_image_max_tiles", 1))


def sample_visuals(visuals: Sequence[torch.Tensor | Sequence[torch.Tensor]], image_processor: "BaseImageProcessor",
                   max_tiles: int, multi_image_max_tiles: int, aspect: str | None = None
                   ) -> tuple[torch.Tensor | None, list[tuple[int, int]], torch.Tensor | None]:
    """One sample's visuals in text order, each an image ((H, W, 3) uint8 RGB) or a video (a list of
    its sampled frames, each (H, W, 3) uint8 RGB) -> ((tiles, 3, H, W) uint8, every image's tiles and
    every frame in order, or None without visuals; a grid (rows, cols) per image and (1, 1) per
    frame; frame_mask, (tiles,) bool flagging the frames, or None without a video). A frame is
    prepared as a single-tile image is. The tile limit per image counts the images alone."""
    images = sum(isinstance(visual, torch.Tensor) for visual in visuals)
    limit = tiles_allowed(max_tiles, multi_image_max_tiles, images)
    pieces, grids, flags = [], [], []
    for visual in visuals:
        if isinstance(visual, torch.Tensor):
            tiles, grid = image_tiles(visual, image_processor, limit, aspect)
            pieces.append(tiles)
            grids.append(grid)
            flags += [False] * len(tiles)
        else:
            pieces += [tower_pixels(frame, image_processor, aspect).unsqueeze(0) for frame in visual]
            grids += [(1, 1)] * len(visual)
            flags += [True] * len(visual)
    # no copy of a lone image's tiles (most samples): cat would make one
    pixels = None if not pieces else pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return pixels, grids, torch.tensor(flags) if any(flags) else None


def prepare_images(images: Sequence[Image.Image], image_processor: "BaseImageProcessor", max_tiles: int | None = None
                   ) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
    """One prompt's PIL images -> sample_visuals' pixels and grids, with the processor's recorded
    tiling; max_tiles (inference's --tiles) overrides its max_tiles (several images still take at
    most the recorded multi_image_max_tiles each)."""
    pixels, grids, _ = sample_visuals([rgb_pixels(image) for image in images], image_processor,
                                      *recorded_tiling(image_processor, max_tiles))
    return pixels, grids


class TileLayout(nn.Module):
    """Lays each image's pooled tiles and each video frame out as their text slots (see the module
    docstring), with a learned row-end embedding between grid rows and a learned frame-end
    embedding after each frame."""

    def __init__(self, lm_dim: int):
        super().__init__()
        self.row_end = nn.Parameter(torch.randn(lm_dim) / lm_dim ** 0.5)
        self.frame_end = nn.Parameter(torch.randn(lm_dim) / lm_dim ** 0.5)

    def forward(self, tile_embeds: torch.Tensor, grids: Sequence[Sequence[int]],
                frame_embeds: torch.Tensor | None = None,
                frame_mask: Sequence[bool] | torch.Tensor | None = None) -> torch.Tensor:
        """(tiles, N, lm_dim) for the images' tiles and frames in order -> (slots, lm_dim), their slots
        in order. frame_mask (read where it lies) flags the frames, whose slots come from
        frame_embeds, (tiles, M, lm_dim) pooled from the same inputs (None: tile_embeds)."""
        pieces, tile = [], 0
        row_end = self.row_end.to(tile_embeds.dtype).unsqueeze(0)
        frame_end = self.frame_end.to(tile_embeds.dtype).unsqueeze(0)
        frame_embeds = tile_embeds if frame_embeds is None else frame_embeds
        for (rows, cols), frame in zip(grids, frame_markers(grids, frame_mask)):
            if rows * cols == 1:
                pieces += [frame_embeds[tile], frame_end] if frame else [tile_embeds[tile]]
                tile += 1
                continue
            for row in range(rows):
                pieces += [tile_embeds[tile + row * cols:tile + (row + 1) * cols].flatten(0, 1), row_end]
            pieces.append(tile_embeds[tile + rows * cols])  # the thumbnail
            tile += rows * cols + 1
        if tile != len(tile_embeds):
            raise ValueError(f"{len(tile_embeds)} tiles for images whose grids {list(map(tuple, grids))} hold {tile}")
        width = tile_embeds.shape[-1]
        slots = torch.cat(pieces) if pieces else tile_embeds.new_zeros(0, width)
        # The row and frame ends join every forward, used or not: ZeRO-3 ranks must all run the same backward.
        return slots + 0.0 * (row_end.sum() + frame_end.sum())
