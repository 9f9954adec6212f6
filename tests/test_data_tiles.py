"""pipeline/data with several images per sample and tiles: decoding (one marker per image, tiles
in order), the tile budget measured on the data, packed batches whose image slots and tiles agree,
the same shapes on every rank, and the packer's figures with tiles."""

import json

import pytest
from PIL import Image

from pipeline.data import TrainBatches, iter_samples
from pipeline.data.decode import measure_text_tokens_per_tile
from pipeline.data.mixture import load_mixture
from pipeline.model.chat import IMAGE_TOKEN, tokenize_record
from pipeline.model.tiles import choose_grid, image_slots, set_tiling, tile_count, tiles_allowed
from pipeline.run.config import DataConfig

NS = [16, 64, 16, 144, 64, 16]


def test_multi_image_samples_decode_to_one_marker_and_grid_per_image_in_order(tiled, models):
    tokenizer, processor = models
    set_tiling(processor, 4, 1)
    try:
        samples = {s["record"]["id"]: s for s in iter_samples(str(tiled / "shards"), tokenizer, processor)}
    finally:
        set_tiling(processor, 1, 1)
    records = {r["id"]: r for r in json.loads((tiled / "raw" / "data.json").read_text())}
    assert len(samples) == len(records)
    kinds = set()
    for key, sample in samples.items():
        images = records[key].get("image", [])
        images = [images] if isinstance(images, str) else images
        marker = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        assert sample["input_ids"].count(marker) == len(images) == len(sample["image_grids"])
        limit = tiles_allowed(4, 1, len(images))
        grids = [choose_grid(*Image.open(tiled / "raw" / path).size, limit, 64) for path in images]
        assert [tuple(g) for g in sample["image_grids"]] == grids  # the loader hands tuples over as lists
        assert (0 if sample["pixel_values"] is None else len(sample["pixel_values"])) == sum(map(tile_count, grids))
        kinds.add((len(images), max(map(tile_count, grids), default=0)))
    assert {(2, 1), (1, 5), (1, 1), (0, 0)} <= kinds  # two-image, tiled, plain and text-only samples all seen


def test_text_tokens_per_tile_are_measured_with_tiles_and_row_ends(tiled, models):
    tokenizer = models[0]
    text = tiles = 0
    for record in json.loads((tiled / "raw" / "data.json").read_text()):
        images = record.get("image", [])
        images = [images] if isinstance(images, str) else images
        grids = [choose_grid(*Image.open(tiled / "raw" / p).size, tiles_allowed(4, 1, len(images)), 64) for p in images]
        text += len(tokenize_record(record, tokenizer, len(images))[0]) - len(images)
        text += sum(image_slots(grid, 0) for grid in grids)  # row ends
        tiles += sum(map(tile_count, grids))
    # 6 shards of 20 samples: reading 64 of each reads them all
    measured = measure_text_tokens_per_tile(load_mixture(str(tiled / "shards")), tokenizer, (4, 1, 64))
    assert measured == pytest.approx(text / tiles)
    one_tile = measure_text_tokens_per_tile(load_mixture(str(tiled / "shards")), tokenizer)
    assert one_tile > measured  # the same text over fewer tower inputs


def check_batch(batch, n, image_id):
    """Each real image's slots are its grid's at N, the real tiles are the grids' tiles, real tiles first."""
    grids = [tuple(g) for g in batch["image_grids"].tolist()]
    assert int((batch["input_ids"] == image_id).sum()) == sum(image_slots(g, n) for g in grids)
    assert int(batch["image_mask"].sum()) == sum(map(tile_count, grids)) == batch["stats"]["num_tiles"]
    assert batch["image_mask"].tolist() == sorted(batch["image_mask"].tolist(), reverse=True)
    assert (batch["pixel_values"][~batch["image_mask"]] == 0).all()


def test_tiled_multi_image_batches_have_the_same_shapes_on_every_rank(tiled, models):
    image_id = models[0].convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = DataConfig(shards=str(tiled / "shards"), seq_len=768, rows_per_batch=2, num_workers=1, max_tiles=4)
    ranks = [TrainBatches(cfg, *models, rank=r, world_size=2) for r in range(2)]
    several = 0
    for n in NS:
        a, b = (loader.next_batch(n) for loader in ranks)
        for key in ["input_ids", "labels", "position_ids", "pixel_values", "image_mask"]:
            assert a[key].shape == b[key].shape, (n, key)
        assert a["pixel_values"].shape == (ranks[0].tile_budget(n), 3, 64, 64)
        for batch in (a, b):
            check_batch(batch, n, image_id)
            several += any(tile_count(g) > 1 for g in batch["image_grids"].tolist())
        assert ranks[0].tile_budget(n) == ranks[1].tile_budget(n)
    assert several  # tiled images were packed


@pytest.mark.parametrize("seq_len, rows, n", [(1024, 2, 16), (1024, 2, 64), (2048, 4, 144)])
def test_tiled_batches_pad_little_and_encode_few_dummy_tiles(tiled, models, seq_len, rows, n):
    """The tile budget measured on the data keeps dummy tiles and padding under 5%. (A 2 x 2 image
    at N=144 takes 722 slots: rows of 1024 can't be filled evenly with them, hence 4 x 2048 there.)"""
    cfg = DataConfig(shards=str(tiled / "shards"), seq_len=seq_len, rows_per_batch=rows, num_workers=1, max_tiles=4)
    loader = TrainBatches(cfg, *models)
    out = [loader.next_batch(n)["stats"] for _ in range(6)]
    pad = sum(s["pad_tokens"] for s in out) / sum(s["pad_tokens"] + s["real_tokens"] for s in out)
    dummy = 1 - sum(s["num_tiles"] for s in out) / sum(s["tile_budget"] for s in out)
    assert pad < 0.05 and dummy < 0.05 and out[-1]["total_dropped"] == 0


def test_one_tile_per_image_gives_the_batches_of_before_tiles(synth, models):
    """max_tiles 1: one tile per image, N slots per marker, no grids but 1 x 1."""
    cfg = DataConfig(shards=str(synth / "shards"), seq_len=512, rows_per_batch=2, num_workers=0, shuffle_buffer=0)
    loader = TrainBatches(cfg, *models)
    for n in (16, 64):
        batch = loader.next_batch(n)
        assert batch["image_grids"].tolist() == [[1, 1]] * batch["stats"]["num_images"]
        assert batch["stats"]["num_tiles"] == batch["stats"]["num_images"]
        check_batch(batch, n, models[0].convert_tokens_to_ids(IMAGE_TOKEN))


def test_a_sample_with_more_tiles_than_a_batch_holds_is_dropped(tiled, models):
    # 256 tokens over (16 + 240) per tile: a budget of one tile, so tiled images and two-image samples go
    cfg = DataConfig(shards=str(tiled / "shards"), seq_len=256, num_workers=0, max_tiles=4, text_tokens_per_image=240)
    loader = TrainBatches(cfg, *models)
    assert loader.tile_budget(16) == 1
    for _ in range(4):
        batch = loader.next_batch(16)
        assert batch["stats"]["num_tiles"] <= 1
    assert batch["stats"]["total_dropped"] > 0
