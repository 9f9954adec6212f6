"""From a shard's sample (bytes by extension) to what training uses: token ids with one image
marker per image, labels, and the image as the tower's 8-bit pixels (pipeline/images.py; the
model normalizes them on its device).

Decoding is here and only here; the stream (pipeline/data/stream.py) calls it after shuffling.
"""

import io
import json
import logging
import tarfile

from PIL import Image

from pipeline.chat import prompt_ids, tokenize_record
from pipeline.images import rgb_pixels, tower_pixels

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "img")


class SampleError(Exception):
    """A sample that can't be used; reason is 'corrupt' (bad bytes) or 'invalid' (bad record)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Decoder:
    """Decodes samples for one tokenizer and image processor. with_record adds the record itself,
    prompt_ids (for generation) and answer (the last reply), for evaluation."""

    def __init__(self, tokenizer, image_processor, image_aspect: str | None = None, with_record: bool = False):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_aspect, self.with_record = image_aspect, with_record

    def __call__(self, sample: dict) -> dict:
        """input_ids, labels and pixel_values ((1, 3, H, W) uint8 or None); SampleError naming the shard and key."""
        where = f"sample {sample.get('__key__')} in shard {sample.get('__url__')}"
        try:
            record = json.loads(sample["json"])
        except (KeyError, ValueError) as exn:
            raise SampleError("corrupt", f"{where}: no readable json ({exn!r})") from exn
        image_keys = [k for k in IMAGE_EXTENSIONS if k in sample]
        num_images = int("image" in record)
        if num_images != len(image_keys[:1]):
            raise SampleError("corrupt", f"{where}: record has {num_images} images, tar member(s) {image_keys}")
        pixels = None
        if num_images:
            try:
                with Image.open(io.BytesIO(sample[image_keys[0]])) as image:
                    rgb = rgb_pixels(image)
            except Exception as exn:  # PIL raises many types for bad bytes; all mean the same here
                raise SampleError("corrupt", f"{where}: undecodable image ({exn!r})") from exn
            pixels = tower_pixels(rgb, self.image_processor, self.image_aspect).unsqueeze(0)
        try:
            input_ids, labels = tokenize_record(record, self.tokenizer, num_images, key=where)
        except (KeyError, TypeError, ValueError) as exn:
            raise SampleError("invalid", str(exn)) from exn
        out = {"input_ids": input_ids, "labels": labels, "pixel_values": pixels}
        if self.with_record:
            out.update(record=record, prompt_ids=prompt_ids(record, self.tokenizer),
                       answer=record["conversations"][-1]["value"])
        return out


def count_text_and_images(urls: list[str], tokenizer, max_shards: int, samples_per_shard: int = 64) -> tuple[int, int, int]:
    """(text tokens, images, samples) in the first samples of up to max_shards evenly spread shards,
    tokenized as training does (text-only samples' text included). Every rank reads the same
    samples, so every rank gets the same numbers."""
    count = min(max_shards, len(urls))
    text = images = samples = 0
    for url in [urls[i * len(urls) // count] for i in range(count)]:
        records = []
        try:
            with tarfile.open(url) as tar:  # reads only the json members: image bytes are skipped
                for member in tar:
                    if member.name.endswith(".json"):
                        records.append(tar.extractfile(member).read())
                        if len(records) == samples_per_shard:
                            break
        except (tarfile.TarError, OSError) as exn:  # the stream logs and skips the same damage
            log.debug("text_tokens_per_image: shard %s unreadable after %d records (%r)", url, len(records), exn)
        for raw in records:
            try:
                record = json.loads(raw)
                num_images = int("image" in record)
                input_ids, _ = tokenize_record(record, tokenizer, num_images)
            except (KeyError, TypeError, ValueError):
                continue  # the stream skips it too
            text += len(input_ids) - num_images
            images += num_images
            samples += 1
    return text, images, samples


def measure_text_tokens_per_image(mixture, tokenizer, max_shards: int = 16) -> float:
    """Text tokens per image of a mixture as training reads it: each source's measured tokens and
    images per sample (count_text_and_images over its share of max_shards), weighted by the
    samples it gives an epoch."""
    share = max(1, max_shards // len(mixture.sources))
    text = images = 0.0
    for source, take in zip(mixture.sources, mixture.takes()):
        source_text, source_images, samples = count_text_and_images(list(source.urls), tokenizer, share)
        if samples:
            text += take * source_text / samples
            images += take * source_images / samples
    return text / images if images else float("inf")
