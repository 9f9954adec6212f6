"""From a shard's sample (bytes by extension) to what training uses: token ids with one image
marker per image, labels, and the images as tiles of the tower's 8-bit pixels (pipeline/model/tiles.py,
pipeline/model/images.py; the model normalizes them on its device) with each image's grid.

A record's "image" is a path (its bytes under the sample's image extension, e.g. key.jpg) or a
list of paths (tools.build_shards stores image i as key.<i>.<ext>, e.g. key.0.jpg, key.1.png).

Decoding is here and only here; the stream (pipeline/data/stream.py) calls it after shuffling.
"""

import io
import json
import logging
import tarfile
from typing import TYPE_CHECKING

import simplejpeg
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from pipeline.data.mixture import Mixture
from pipeline.model.chat import prompt_ids, tokenize_record
from pipeline.model.images import rgb_pixels
from pipeline.model.tiles import choose_grid, image_slots, recorded_tiling, sample_tiles, tile_count, tiles_allowed

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "img")


class SampleError(Exception):
    """A sample that can't be used; reason is 'corrupt' (bad bytes) or 'invalid' (bad record)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def record_images(record: dict) -> list:
    """The record's image paths, in order: none, its one "image" path, or its "image" list."""
    images = record.get("image", [])
    return [images] if isinstance(images, str) else list(images)


def image_members(sample: dict, record: dict) -> list[bytes]:
    """The sample's image bytes in the record's order; ValueError when the members don't match the record."""
    paths = record_images(record)
    if isinstance(record.get("image"), str):
        keys = [k for k in IMAGE_EXTENSIONS if k in sample][:1]
    else:
        keys = [k for i in range(len(paths)) for k in [f"{i}.{ext}" for ext in IMAGE_EXTENSIONS] if k in sample]
    if len(keys) != len(paths):
        members = sorted(k for k in sample if not k.startswith("__") and k != "json")
        raise ValueError(f"record has {len(paths)} images, image member(s) {members}")
    return [sample[k] for k in keys]


def decode_rgb(data: bytes) -> torch.Tensor:
    """(H, W, 3) uint8: an image file's pixels, as pipeline.model.images.rgb_pixels makes of PIL's decode.
    Colour and grayscale JPEGs go through simplejpeg: libjpeg-turbo in one call straight to RGB,
    the same pixels in about half the time PIL takes to decode and convert them
    (bench/loader_results.md). Other JPEGs (CMYK: PIL converts them its own way), damaged ones and
    other formats go through PIL, which decodes them or says why not."""
    try:
        if data[:2] == b"\xff\xd8" and simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray"):
            return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    except ValueError:  # simplejpeg's error for data libjpeg-turbo refuses or warns about
        pass
    with Image.open(io.BytesIO(data)) as image:
        return rgb_pixels(image)


class Decoder:
    """Decodes samples for one tokenizer and image processor. image_aspect, max_tiles and
    multi_image_max_tiles: None takes the processor's recorded ones (pipeline/model/images.py,
    pipeline/model/tiles.py). with_record adds the record itself, prompt_ids (for generation) and answer
    (the last reply), for evaluation."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: "BaseImageProcessor",
                 image_aspect: str | None = None, with_record: bool = False, max_tiles: int | None = None,
                 multi_image_max_tiles: int | None = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_aspect, self.with_record = image_aspect, with_record
        self.max_tiles, self.multi_image_max_tiles = recorded_tiling(image_processor, max_tiles, multi_image_max_tiles)

    def __call__(self, sample: dict) -> dict:
        """input_ids, labels, pixel_values ((tiles, 3, H, W) uint8 or None) and image_grids (each
        image's (rows, cols)); SampleError naming the shard and key."""
        where = f"sample {sample.get('__key__')} in shard {sample.get('__url__')}"
        try:
            record = json.loads(sample["json"])
            members = image_members(sample, record)
        except (KeyError, ValueError) as exn:
            raise SampleError("corrupt", f"{where}: no readable json or images ({exn!r})") from exn
        rgbs = []
        for index, data in enumerate(members):
            try:
                rgbs.append(decode_rgb(data))
            except Exception as exn:  # PIL raises many types for bad bytes; all mean the same here
                raise SampleError("corrupt", f"{where}: undecodable image {index} ({exn!r})") from exn
        pixels, grids = sample_tiles(rgbs, self.image_processor, self.max_tiles, self.multi_image_max_tiles,
                                     self.image_aspect)
        try:
            input_ids, labels = tokenize_record(record, self.tokenizer, len(rgbs), key=where)
        except (KeyError, TypeError, ValueError) as exn:
            raise SampleError("invalid", str(exn)) from exn
        out = {"input_ids": input_ids, "labels": labels, "pixel_values": pixels, "image_grids": grids}
        if self.with_record:
            out.update(record=record, prompt_ids=prompt_ids(record, self.tokenizer),
                       answer=record["conversations"][-1]["value"])
        return out


def first_samples(url: str, count: int, with_images: bool) -> list[dict]:
    """The first `count` samples of a shard (json, and image members when with_images), read
    straight from the tar; what damage leaves unread is left out (the stream logs and skips it)."""
    samples = []
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                if not samples or samples[-1]["__key__"] != key:
                    if len(samples) == count:
                        break
                    samples.append({"__key__": key})
                if extension == "json" or (with_images and extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS):
                    samples[-1][extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exn:
        log.debug("text_tokens_per_tile: shard %s unreadable after %d samples (%r)", url, len(samples), exn)
        samples = samples[:-1]  # the one being read may be cut short
    return samples


def count_text_and_tiles(urls: list[str], tokenizer: PreTrainedTokenizerBase, max_shards: int,
                         tiling: tuple[int, int, int] = (1, 1, 1), samples_per_shard: int = 64
                         ) -> tuple[int, int, int]:
    """(text tokens, tiles, samples) in the first samples of up to max_shards evenly spread shards,
    tokenized as training does (text-only samples' text included; an image's row ends count as
    text). tiling: (max_tiles, multi_image_max_tiles, tile side); with more than one tile the
    images' sizes are read from their headers. Every rank reads the same samples, so every rank
    gets the same numbers."""
    max_tiles, multi_image_max_tiles, tile_side = tiling
    count = min(max_shards, len(urls))
    text = tiles = samples = 0
    for url in [urls[i * len(urls) // count] for i in range(count)]:
        for sample in first_samples(url, samples_per_shard, with_images=max_tiles > 1):
            try:
                record = json.loads(sample["json"])
                num_images = len(record_images(record))
                input_ids, _ = tokenize_record(record, tokenizer, num_images)
                grids = [(1, 1)] * num_images
                if max_tiles > 1:
                    limit = tiles_allowed(max_tiles, multi_image_max_tiles, num_images)
                    grids = []
                    for data in image_members(sample, record):
                        with Image.open(io.BytesIO(data)) as image:  # the header only: no pixels decoded
                            grids.append(choose_grid(*image.size, limit, tile_side))
            except (KeyError, TypeError, ValueError, OSError):  # the stream skips it too (PIL raises OSError)
                continue
            text += len(input_ids) - num_images + sum(image_slots(grid, 0) for grid in grids)
            tiles += sum(tile_count(grid) for grid in grids)
            samples += 1
    return text, tiles, samples


def measure_text_tokens_per_tile(mixture: Mixture, tokenizer: PreTrainedTokenizerBase,
                                 tiling: tuple[int, int, int] = (1, 1, 1), max_shards: int = 16) -> float:
    """Text tokens per tile of a mixture as training reads it (one tile per image when max_tiles
    is 1): each source's measured tokens and tiles per sample (count_text_and_tiles over its share
    of max_shards), weighted by the samples it gives an epoch."""
    share = max(1, max_shards // len(mixture.sources))
    text = tiles = 0.0
    for source, take in zip(mixture.sources, mixture.takes()):
        source_text, source_tiles, samples = count_text_and_tiles(list(source.urls), tokenizer, share, tiling)
        if samples:
            text += take * source_text / samples
            tiles += take * source_tiles / samples
    return text / tiles if tiles else float("inf")
