"""How images become the vision tower's pixels, alike in training, evaluation and generation.

Model folders carry this module as transformers remote code (see pipeline/model/vlm.py): it needs
nothing beyond PIL, torch and the image processor.

Two stages, split where the DataLoader's worker boundary lies:
1. Wherever images are opened (loader workers, generation): an image becomes (3, H, W) uint8 at
   the tower's input size, one function per step: rgb_pixels (RGB as the image processor
   converts: transparency over white; loader workers decode JPEGs to the same pixels with
   simplejpeg, pipeline/data/decode.py), pad_to_square (data.image_aspect pad, LLaVA-1.5's square
   in the processor's mean colour; resize: none), resize_to_tower (the processor's size and
   resample filter). 8-bit pixels cross the worker boundary: a quarter of float32's bytes.
2. In the model's forward, on its device: normalize_pixels, the processor's rescale and
   normalize as a table of what the processor itself makes of each 8-bit value (pixel_table).

The resize is torch's antialiased bilinear/bicubic kernel on uint8 (the one torchvision's resize
calls), several times faster than PIL's (bench/loader_results.md), with its passes in Pillow's
order. Against transformers' PIL image processors (what transformers uses without torchvision,
as in this project's environment) it rounds differently: at most 2 levels of 255, on under 1% of
values (tests/test_images.py holds that tolerance).
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch.nn import functional as F

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor

RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL's BILINEAR and BICUBIC: torch has both antialiased
IMAGE_ASPECTS = ("pad", "resize")  # data.image_aspect: see tower_pixels


def set_image_aspect(image_processor: "BaseImageProcessor", aspect: str) -> None:
    """Record data.image_aspect on the image processor: model folders save it with the processor
    (preprocessor_config.json), so evaluation and generation prepare images as training did."""
    image_processor.image_aspect = aspect


def image_pixel_values(images: Sequence[Image.Image], image_processor: "BaseImageProcessor",
                       aspect: str | None = None) -> torch.Tensor:
    """(len(images), 3, H, W) uint8 for PIL images, ready for the model (which normalizes them).
    aspect: pad (to a square in the processor's mean colour, as LLaVA-1.5 does) or resize; None:
    the processor's recorded one (folders written before it was recorded were trained with resize)."""
    return torch.stack([tower_pixels(rgb_pixels(image), image_processor, aspect) for image in images])


def tower_pixels(rgb: torch.Tensor, image_processor: "BaseImageProcessor", aspect: str | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, height, width) uint8 at the tower's input size."""
    if (aspect or getattr(image_processor, "image_aspect", "resize")) == "pad":
        rgb = pad_to_square(rgb, [int(255 * m) for m in image_processor.image_mean])
    return resize_to_tower(rgb, image_processor)


def rgb_pixels(image: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8: the image decoded and converted to RGB as transformers' image processors
    convert it (transparency composited over white, so a transparent PNG does not turn black)."""
    if "A" in image.getbands() or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)


def pad_to_square(rgb: torch.Tensor, background: Sequence[int]) -> torch.Tensor:
    """(H, W, 3) -> (S, S, 3), S = max(H, W): the image centred on the background colour."""
    height, width, _ = rgb.shape
    side = max(height, width)
    if height == width:
        return rgb
    # one background row, repeated: contiguous copies, much faster than a per-pixel fill
    row = torch.tensor(background, dtype=torch.uint8).repeat(side)
    square = row.expand(side, side * 3).contiguous().view(side, side, 3)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = rgb
    return square


def tower_size(image_processor: "BaseImageProcessor") -> tuple[int, int]:
    """(height, width) of the tower's input; ValueError unless the processor resizes to a fixed size without a crop."""
    size = dict(image_processor.size)  # transformers' SizeDict lists only the fields it has
    if set(size) != {"height", "width"} or getattr(image_processor, "do_center_crop", False):
        raise ValueError(f"image processor {type(image_processor).__name__} resizes to {size} and crops "
                         f"{getattr(image_processor, 'do_center_crop', False)}: the pipeline needs a fixed "
                         f"{{height, width}} without a crop, as SigLIP's processors have")
    return size["height"], size["width"]


def resize_to_tower(rgb: torch.Tensor, image_processor: "BaseImageProcessor") -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, height, width) uint8: the processor's size and resample filter,
    antialiased as PIL resamples."""
    return resize_rgb(rgb, *tower_size(image_processor), image_processor)


def resize_rgb(rgb: torch.Tensor, height: int, width: int, image_processor: "BaseImageProcessor") -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, height, width) uint8 with the processor's resample filter (tiles
    resize a whole image to their grid's size with it)."""
    mode = RESAMPLE_MODES.get(int(image_processor.resample))
    if mode is None:
        raise ValueError(f"image processor resample {image_processor.resample!r}: the pipeline resizes with "
                         f"bilinear (2) or bicubic (3) only")
    # (1, 3, H, W) in channels-last memory: the layout of torch's vectorized uint8 kernel
    batch = rgb.permute(2, 0, 1).unsqueeze(0)
    # Each pass rounds to 8 bits and clips bicubic's overshoot, so the order of the passes shows
    # in the pixels. torch resamples columns first; Pillow resamples rows first when that drops
    # more than twice as many rows as columns (Pillow 13, found by experiment): follow it.
    if height < rgb.shape[0] and rgb.shape[0] - height > 2 * (rgb.shape[1] - width):
        batch = F.interpolate(batch, size=(height, rgb.shape[1]), mode=mode, antialias=True)
    return F.interpolate(batch, size=(height, width), mode=mode, antialias=True)[0]


def pixel_table(image_processor: "BaseImageProcessor") -> torch.Tensor:
    """(3, 256) float32: what the image processor makes of each 8-bit value in each channel (its
    rescale and normalize), computed by the processor itself on an image of all 256 values."""
    ramp = Image.frombytes("RGB", (256, 1), bytes(value for value in range(256) for _ in range(3)))
    values = image_processor(images=[ramp], do_resize=False, do_center_crop=False, return_tensors="pt")
    return torch.as_tensor(values["pixel_values"][0, :, 0, :], dtype=torch.float32)


def normalize_pixels(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(tiles, 3, H, W) uint8 -> the processor's float values, on the pixels' device."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixel values must be (tiles, 3, H, W) uint8 from pipeline.model.tiles.prepare_images, "
                         f"got {tuple(pixels.shape)} {pixels.dtype}")
    channels = torch.arange(3, device=pixels.device).view(3, 1, 1)
    return table[channels, pixels.long()]
