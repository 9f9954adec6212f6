"""pipeline/model/tiles.py: the grid rule, cutting an image into tiles, slot counts and the tiles'
layout in the text."""

import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessor

from pipeline.model.images import rgb_pixels, tower_pixels
from pipeline.model.tiles import (
    TileLayout,
    candidate_grids,
    choose_grid,
    image_slots,
    image_tiles,
    largest_image_slots,
    prepare_images,
    set_tiling,
    tile_count,
    tiles_allowed,
)

SIDE = 64


@pytest.fixture
def processor():
    return SiglipImageProcessor(size={"height": SIDE, "width": SIDE}, resample=3)


def test_candidate_grids_are_every_grid_within_the_limit_fewest_tiles_first():
    assert candidate_grids(1) == [(1, 1)]
    grids = candidate_grids(6)
    assert set(grids) == {(r, c) for r in range(1, 7) for c in range(1, 7) if r * c <= 6}
    assert [r * c for r, c in grids] == sorted(r * c for r, c in grids)


@pytest.mark.parametrize("size, max_tiles, grid", [
    ((1920, 480), 6, (1, 4)),   # wide 4:1: one row of four
    ((480, 1920), 6, (4, 1)),   # tall 1:4: one column of four
    ((1280, 720), 6, (1, 2)),   # 16:9 is nearest 2:1 (3:2 is further)
    ((640, 480), 6, (2, 3)),    # COCO's 4:3 is nearest 3:2
    ((480, 640), 6, (3, 2)),
    ((640, 640), 6, (2, 2)),    # square and large: 2 x 2 ties 1 x 1 and wins, the image has the pixels
    ((64, 64), 6, (1, 1)),      # square and small: stays one tile (not blown up)
    ((1920, 480), 1, (1, 1)),   # max_tiles 1: always one tile
    ((4000, 100), 4, (1, 4)),   # far wider than any grid: the widest allowed
])
def test_grid_has_the_closest_aspect_ratio_within_max_tiles(size, max_tiles, grid):
    assert choose_grid(*size, max_tiles, SIDE) == grid


def test_slot_and_tile_counts():
    assert tile_count((1, 1)) == 1 and image_slots((1, 1), 64) == 64  # one tile: exactly N, as before tiles
    assert tile_count((2, 3)) == 7  # six tiles and the thumbnail
    assert image_slots((2, 3), 16) == 7 * 16 + 2  # N per tile, a row end per row
    assert largest_image_slots(1, 144) == 144
    assert largest_image_slots(6, 16) == max(image_slots(g, 16) for g in [(1, 6), (2, 3), (3, 2), (6, 1)]) == 7 * 16 + 6
    assert tiles_allowed(6, 1, 1) == 6 and tiles_allowed(6, 1, 2) == 1 and tiles_allowed(2, 4, 3) == 2


def quadrants(width, height):
    """An image of four coloured quadrants: red, green / blue, white."""
    image = Image.new("RGB", (width, height))
    for (x, y), colour in zip(
        [(0, 0), (1, 0), (0, 1), (1, 1)], [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    ):
        image.paste(colour, (x * width // 2, y * height // 2, (x + 1) * width // 2, (y + 1) * height // 2))
    return image


def test_tiles_are_cut_row_by_row_and_the_thumbnail_comes_last(processor):
    rgb = rgb_pixels(quadrants(256, 256))
    tiles, grid = image_tiles(rgb, processor, max_tiles=4, aspect="pad")
    assert grid == (2, 2) and tiles.shape == (5, 3, SIDE, SIDE) and tiles.dtype == torch.uint8
    centres = [tuple(tile[:, SIDE // 2, SIDE // 2].tolist()) for tile in tiles[:4]]
    assert centres == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    assert torch.equal(tiles[4], tower_pixels(rgb, processor, "pad"))  # the whole image as one tile


def test_one_tile_is_the_image_as_before_tiles(processor):
    rgb = rgb_pixels(quadrants(300, 100))
    tiles, grid = image_tiles(rgb, processor, max_tiles=1, aspect="pad")
    assert grid == (1, 1) and torch.equal(tiles, tower_pixels(rgb, processor, "pad").unsqueeze(0))


def test_prepare_images_follows_the_recorded_tiling_and_its_override(processor):
    wide = quadrants(256, 64)
    assert prepare_images([wide], processor)[1] == [(1, 1)]  # nothing recorded: one tile
    set_tiling(processor, 4, 1)
    pixels, grids = prepare_images([wide], processor)
    assert grids == [(1, 4)] and len(pixels) == 5
    assert prepare_images([wide, wide], processor)[1] == [(1, 1), (1, 1)]  # multi-image: 1 tile each
    assert prepare_images([wide], processor, max_tiles=2)[1] == [(1, 2)]
    assert prepare_images([], processor) == (None, [])


def test_layout_puts_row_ends_after_each_grid_row_and_the_thumbnail_last():
    layout = TileLayout(lm_dim=3)
    n = 2
    tiles = torch.arange(6 * n * 3, dtype=torch.float32).view(6, n, 3)  # one image of 1 tile, one of 2 x 2 + thumbnail
    slots = layout(tiles, [(1, 1), (2, 2)])
    assert slots.shape == (image_slots((1, 1), n) + image_slots((2, 2), n), 3)
    end = layout.row_end.detach()
    expected = torch.cat([tiles[0], tiles[1], tiles[2], end[None], tiles[3], tiles[4], end[None], tiles[5]])
    assert torch.equal(slots.detach(), expected)
    with pytest.raises(ValueError, match="6 tiles for images whose grids"):
        layout(tiles, [(2, 2)])


def test_row_end_gets_a_gradient_only_from_images_with_several_tiles():
    layout = TileLayout(lm_dim=3)
    layout(torch.ones(2, 1, 3), [(1, 1), (1, 1)]).sum().backward()
    assert layout.row_end.grad is not None and torch.count_nonzero(layout.row_end.grad) == 0  # joined, weight zero
    layout.row_end.grad = None
    layout(torch.ones(3, 1, 3), [(1, 2)]).sum().backward()
    assert torch.equal(layout.row_end.grad, torch.ones(3))
