"""High-resolution images as tiles at the vision tower's input size, and where tiles sit in the text.

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


def sample_tiles(rgbs: Sequence[torch.Tensor], image_processor: "BaseImageProcessor", max_tiles: int,
                 multi_image_max_tiles: int, aspect: str | None = None
                 ) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
    """One sample's images ((H, W, 3) uint8 RGB each, in order) -> ((tiles, 3, H, W) uint8, every
    image's tiles in order, or None without images; each image's grid (rows, cols))."""
    limit = tiles_allowed(max_tiles, multi_image_max_tiles, len(rgbs))
    tiled = [image_tiles(rgb, image_processor, limit, aspect) for rgb in rgbs]
    if len(tiled) <= 1:  # no copy of a lone image's tiles (most samples): cat would make one
        return (tiled[0][0] if tiled else None), [grid for _, grid in tiled]
    return torch.cat([tiles for tiles, _ in tiled]), [grid for _, grid in tiled]


def prepare_images(images: Sequence[Image.Image], image_processor: "BaseImageProcessor", max_tiles: int | None = None
                   ) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
    """One prompt's PIL images -> sample_tiles, with the processor's recorded tiling; max_tiles
    (inference's --tiles) overrides its max_tiles (several images still take at most the
    recorded multi_image_max_tiles each)."""
    return sample_tiles([rgb_pixels(image) for image in images], image_processor,
                        *recorded_tiling(image_processor, max_tiles))


class TileLayout(nn.Module):
    """Lays each image's pooled tiles out as its text slots (see the module docstring), with a
    learned row-end embedding between grid rows."""

    def __init__(self, lm_dim: int):
        super().__init__()
        self.row_end = nn.Parameter(torch.randn(lm_dim) / lm_dim ** 0.5)

    def forward(self, tile_embeds: torch.Tensor, grids: Sequence[Sequence[int]]) -> torch.Tensor:
        """(tiles, N, lm_dim) for the images' tiles in order -> (slots, lm_dim), the images' slots in order."""
        pieces, tile = [], 0
        row_end = self.row_end.to(tile_embeds.dtype).unsqueeze(0)
        for rows, cols in grids:
            if rows * cols == 1:
                pieces.append(tile_embeds[tile])
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
        # The row end joins every forward, used or not: ZeRO-3 ranks must all run the same backward.
        return slots + 0.0 * row_end.sum()
