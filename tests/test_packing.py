"""pipeline/data/packing.py: the row chooser, image-slot fit and the tile budget, without a loader."""

import itertools
import math
import random

import pytest

from pipeline.data.packing import choose_row, image_slots_fit, sample_length, tile_budget


def test_oldest_goes_first_then_the_fullest_fill_with_older_samples_preferred():
    lengths, images = [10, 50, 40, 30, 20], [1, 1, 0, 1, 0]
    # 10 + 50 + 40 and 10 + 40 + 30 + 20 both fill 100 with two images: the older samples win.
    assert choose_row(lengths, images, free=100, tiles_left=2, target=2) == [0, 1, 2]


def test_image_budget_is_respected_and_an_oldest_sample_over_budget_waits():
    lengths, images = [30, 40, 30, 20, 10], [1, 1, 0, 0, 1]
    assert choose_row(lengths, images, free=100, tiles_left=1, target=1) == [0, 2, 3]
    assert choose_row(lengths, images, free=100, tiles_left=0, target=0) == [2, 3]


def test_equal_fills_take_the_image_count_nearest_the_target():
    lengths, images = [20, 40, 40], [0, 1, 0]  # 20 + 40 fills 60 either with an image or without
    assert choose_row(lengths, images, free=60, tiles_left=3, target=1) == [0, 1]
    assert choose_row(lengths, images, free=60, tiles_left=3, target=0) == [0, 2]


def brute_force_best(lengths, images, free, images_left):
    """The largest fill reachable with the oldest sample in (when the budget allows it)."""
    forced = [0] if images[0] <= images_left else []
    rest = [i for i in range(len(lengths)) if i not in forced]
    best = 0
    for size in range(len(rest) + 1):
        for subset in itertools.combinations(rest, size):
            chosen = forced + list(subset)
            if sum(lengths[i] for i in chosen) <= free and sum(images[i] for i in chosen) <= images_left:
                best = max(best, sum(lengths[i] for i in chosen))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_choose_row_finds_the_fullest_fill_within_the_budget(seed):
    rng = random.Random(seed)
    count = rng.randint(1, 9)
    lengths = [rng.randint(1, 60) for _ in range(count)]
    images = [rng.choice([0, 0, 1, 1, 2]) for _ in range(count)]
    free, images_left = rng.randint(60, 150), rng.randint(0, 4)
    lengths[0] = min(lengths[0], free)  # a row always holds its oldest sample (lengths are capped)
    chosen = choose_row(lengths, images, free, images_left, target=rng.uniform(0, images_left))
    assert chosen == sorted(set(chosen))
    assert sum(lengths[i] for i in chosen) <= free and sum(images[i] for i in chosen) <= images_left
    assert (0 in chosen) == (images[0] <= images_left)
    assert sum(lengths[i] for i in chosen) == brute_force_best(lengths, images, free, images_left)


def test_sample_length_expands_markers_and_caps_at_the_row():
    assert sample_length(100, [64], 2048) == 163  # the marker becomes 64 slots
    assert sample_length(100, [], 2048) == 100
    assert sample_length(2000, [256], 2048) == 2048  # truncated to one full row
    # two images: one of 2 x 2 tiles at N=16 (4 tiles + thumbnail, 2 row ends = 82 slots), one of one tile
    assert sample_length(100, [82, 16], 2048) == 100 + 81 + 15


def test_image_slots_must_end_within_the_row():
    assert image_slots_fit([], [], 96)
    assert image_slots_fit([5], [64], 69) and not image_slots_fit([5], [64], 68)
    assert image_slots_fit([5, 10], [16, 16], 10 + 15 + 16) and not image_slots_fit([5, 10], [16, 16], 10 + 15 + 15)
    # images of different slot counts: the second one starts after the first one's 82 slots
    assert image_slots_fit([5, 10], [82, 16], 10 + 81 + 16) and not image_slots_fit([5, 10], [82, 16], 10 + 81 + 15)
    assert image_slots_fit([5, 10], [16, 82], 10 + 15 + 82) and not image_slots_fit([5, 10], [16, 82], 10 + 15 + 81)


def test_tile_budget_rounds_up_and_is_at_least_one():
    assert tile_budget(8192, 64, 120) == math.ceil(8192 / 184) == 45
    assert tile_budget(8192, 256, 0) == 32
    assert tile_budget(512, 256, float("inf")) == 1  # data without images: one (dummy) slot
