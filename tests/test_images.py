"""pipeline/model/images.py: the pixels the tower sees are the image processor's, within a stated
tolerance, on a real photograph and on grayscale and transparent images, for pad and resize, by
the loader workers' route and by generation's alike; the model normalizes them as the processor.
The loader's JPEG decode (simplejpeg) gives PIL's pixels exactly.

Tolerance: the resize is torch's uint8 kernel, not PIL's, so values may differ from the
processor's by at most 2 levels of 255 (after its rescale and normalize), on at most 1% of them.
"""

import io
import json

import numpy as np
import pytest
import simplejpeg
import torch
from matplotlib import cbook
from PIL import Image
from transformers import AutoImageProcessor, SiglipImageProcessor

from pipeline.data.decode import Decoder, SampleError, decode_rgb
from pipeline.model.chat import IMAGE_TOKEN, load_tokenizer
from pipeline.model.images import image_pixel_values, normalize_pixels, pixel_table, rgb_pixels
from pipeline.model.vision import tower_features
from pipeline.model.vlm import TokenFlexVLM

MAX_LEVELS, MAX_FRACTION = 2, 0.01


def encoded(image, format, **options):
    out = io.BytesIO()
    image.save(out, format, **options)
    return out.getvalue()


def photograph():
    """Grace Hopper's portrait (512x600 JPEG), which matplotlib ships as sample data."""
    with open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as f:
        return f.read()


def grayscale():
    """A landscape crop of the photograph as a grayscale JPEG."""
    with Image.open(io.BytesIO(photograph())) as photo:
        return encoded(photo.convert("L").crop((0, 0, 512, 400)), "JPEG", quality=90)


def transparent():
    """A portrait crop as an RGBA PNG: a fully transparent strip and a half-transparent band."""
    with Image.open(io.BytesIO(photograph())) as photo:
        rgba = np.array(photo.convert("RGBA").crop((0, 0, 400, 600)))
    rgba[:, :130, 3] = 0
    rgba[200:300, :, 3] = 128
    return encoded(Image.fromarray(rgba), "PNG")


def progressive():
    """The photograph as a progressive JPEG with full-resolution colour (no chroma subsampling)."""
    with Image.open(io.BytesIO(photograph())) as photo:
        return encoded(photo, "JPEG", quality=90, progressive=True, subsampling=0)


def cmyk():
    """The photograph as a CMYK JPEG, as print workflows save them: PIL converts those its own way."""
    with Image.open(io.BytesIO(photograph())) as photo:
        return encoded(photo.convert("CMYK"), "JPEG", quality=90)


IMAGES = {"photograph": (photograph, "jpg"), "grayscale": (grayscale, "jpg"), "transparent": (transparent, "png")}


@pytest.fixture(scope="module")
def processor():
    """SigLIP-so400m-patch14-384's image processor, as its preprocessor_config.json has it."""
    return SiglipImageProcessor(size={"height": 384, "width": 384}, resample=3, do_rescale=True,
                                rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def processor_reference(data, processor, aspect):
    """What the processor gives for the image file; pad: LLaVA-1.5's square in the mean colour first."""
    image = Image.open(io.BytesIO(data))
    if aspect == "pad":
        image = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
        side = max(image.size)
        square = Image.new(image.mode, (side, side), tuple(int(255 * m) for m in processor.image_mean))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    return processor(images=[image], return_tensors="pt")["pixel_values"]


def worker_pixels(data, extension, processor, aspect, tokenizer):
    """The pixel values a loader worker makes of a shard sample holding the image file."""
    record = {"image": f"x.{extension}", "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\nwhat?"},
                                                           {"from": "gpt", "value": "a person"}]}
    sample = {
        "__key__": "000000000",
        "__url__": "shard-000000.tar",
        "json": json.dumps(record).encode(),
        extension: data,
    }
    return Decoder(tokenizer, processor, aspect)(sample)["pixel_values"]


@pytest.mark.parametrize("make, fast", [(photograph, True), (grayscale, True), (progressive, True), (cmyk, False),
                                        (transparent, False)])
def test_the_loaders_decode_gives_pils_pixels(make, fast, monkeypatch):
    """The loader decodes colour and grayscale JPEGs with simplejpeg, CMYK JPEGs and other formats
    with PIL, and gives PIL's pixels either way. simplejpeg's decode is watched (the real one runs),
    so that for the fast path the comparison is simplejpeg's pixels against PIL's, not PIL's twice."""
    calls = []

    def watched_decode_jpeg(*args, **kwargs):
        calls.append(args[0])
        return real_decode_jpeg(*args, **kwargs)

    real_decode_jpeg = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", watched_decode_jpeg)
    data = make()
    with Image.open(io.BytesIO(data)) as image:
        assert torch.equal(decode_rgb(data), rgb_pixels(image))
    assert calls == ([data] if fast else [])


def test_a_damaged_jpeg_is_a_corrupt_sample(processor, tiny_models):
    """libjpeg-turbo would fill the missing part with grey; the loader refuses it, as PIL does."""
    with pytest.raises(SampleError, match="sample 000000000 in shard shard-000000.tar: undecodable image 0") as error:
        worker_pixels(photograph()[:20_000], "jpg", processor, "pad", load_tokenizer(tiny_models / "qwen2"))
    assert error.value.reason == "corrupt"


@pytest.mark.parametrize("aspect", ["pad", "resize"])
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_pixels_are_the_processors_within_two_levels(name, aspect, processor, tiny_models):
    make, extension = IMAGES[name]
    data = make()
    generation = image_pixel_values([Image.open(io.BytesIO(data))], processor, aspect)
    loader = worker_pixels(data, extension, processor, aspect, load_tokenizer(tiny_models / "qwen2"))
    assert generation.dtype == loader.dtype == torch.uint8 and generation.shape == (1, 3, 384, 384)
    assert torch.equal(generation, loader)  # training and generation see the same pixels

    table = pixel_table(processor)
    level = (table[:, 1] - table[:, 0]).view(1, 3, 1, 1)  # one 8-bit step after rescale and normalize
    levels = (
        (normalize_pixels(generation, table) - processor_reference(data, processor, aspect)).abs() / level
    ).round()
    assert levels.max() <= MAX_LEVELS
    assert (levels > 0).float().mean() <= MAX_FRACTION


def test_transparency_is_composited_over_white_and_padding_is_the_mean_colour(processor):
    pixels = image_pixel_values([Image.open(io.BytesIO(transparent()))], processor, "pad")[0]
    # the 400x600 portrait sits in a 600x600 square, scaled by 384/600: columns 0-63 are padding,
    # then its fully transparent strip (130 columns, about 83 once scaled), half transparent in
    # rows 200-300 (128-192 once scaled)
    assert (pixels[:, :, :60] == 127).all()
    assert (pixels[:, :120, 70:140] == 255).all()


def test_the_model_normalizes_8_bit_pixels_as_the_processor_does(tiny_models):
    model = TokenFlexVLM.from_components(tiny_models / "vision", tiny_models / "qwen2").eval()
    processor = AutoImageProcessor.from_pretrained(tiny_models / "vision")
    with Image.open(io.BytesIO(photograph())) as photo:
        image = photo.resize((64, 64))  # the tiny tower's input size: the processor's resize changes nothing
    pixels = model.prepared_images([image])["pixel_values"]
    assert pixels.dtype == torch.uint8
    with torch.no_grad():
        reference = tower_features(model.vision_tower, processor(images=[image], return_tensors="pt")["pixel_values"],
                                   model.config.vision_feature_layer)
        assert torch.equal(model.image_features(pixels), reference)
        with pytest.raises(ValueError, match="uint8"):
            model.image_features(pixels.float())
