"""Real-photograph JPEGs for the loader benchmark, made from the one photograph installed here:
matplotlib's sample data, Grace Hopper's portrait (512x600, JPEG). Nothing is downloaded.

coco: COCO-size files (640x480, 480x640, 640x427, 427x640, 640x512, 500x375, 612x612), each a
    crop of a 2x2 mosaic of the photograph (tiles mirrored or flipped at random) rescaled by
    0.8-1.25, saved at JPEG quality 70-90: median about 60 KB, like COCO's train2017.
large: 1,500-2,048 px on the long side (2048x1536, 1536x2048, 2000x1500, 1800x1200,
    1600x1600), crops of a 4x4 mosaic at the photograph's own scale (so the detail per pixel
    is a photograph's, not an upscale's), saved at quality 80-92.
"""

import io
import random
from pathlib import Path

from matplotlib import cbook
from PIL import Image, ImageOps

SIZES = {"coco": [(640, 480), (480, 640), (640, 427), (427, 640), (640, 512), (500, 375), (612, 612)],
         "large": [(2048, 1536), (1536, 2048), (2000, 1500), (1800, 1200), (1600, 1600)]}


def mosaic(photo, tiles, rng):
    """tiles x tiles copies of the photograph, each mirrored or flipped at random."""
    width, height = photo.size
    out = Image.new("RGB", (width * tiles, height * tiles))
    for row in range(tiles):
        for column in range(tiles):
            tile = ImageOps.mirror(photo) if rng.random() < 0.5 else photo
            out.paste(ImageOps.flip(tile) if rng.random() < 0.3 else tile, (column * width, row * height))
    return out


def jpeg(image, quality):
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_photos(out_dir, kind, n, seed=0):
    """n JPEG files of `kind` (coco or large) in out_dir; returns their names."""
    rng = random.Random(f"{seed}/{kind}")
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
        source = mosaic(photo.convert("RGB"), 2 if kind == "coco" else 4, rng)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(n):
        width, height = rng.choice(SIZES[kind])
        scale = rng.uniform(0.8, 1.25) if kind == "coco" else 1.0
        crop_w, crop_h = int(width * scale), int(height * scale)
        left, top = rng.randint(0, source.width - crop_w), rng.randint(0, source.height - crop_h)
        image = source.crop((left, top, left + crop_w, top + crop_h))
        if (crop_w, crop_h) != (width, height):
            image = image.resize((width, height), Image.BICUBIC)
        quality = rng.randint(70, 90) if kind == "coco" else rng.randint(80, 92)
        names.append(f"{kind}-{index:05d}.jpg")
        (Path(out_dir) / names[-1]).write_bytes(jpeg(image, quality))
    return names
