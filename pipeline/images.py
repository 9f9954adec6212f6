"""How images become pixel values: data.image_aspect (LLaVA-1.5's pad-to-square, or a plain resize)
recorded on the image processor, so training, evaluation and generation prepare images alike.

Model folders carry this module as transformers remote code (see pipeline/model.py): it needs
nothing beyond PIL and the image processor.
"""

from PIL import Image


def set_image_aspect(image_processor, aspect):
    """Record data.image_aspect on the image processor: model folders save it with the processor
    (preprocessor_config.json), so evaluation and generation prepare images as training did."""
    image_processor.image_aspect = aspect


def image_pixel_values(images, image_processor, aspect=None):
    """(len(images), 3, H, W) for PIL images. aspect: pad (to a square in the processor's mean
    colour, as LLaVA-1.5 does) or resize; None: the processor's recorded one (folders written
    before it was recorded were trained with resize)."""
    if (aspect or getattr(image_processor, "image_aspect", "resize")) == "pad":
        background = tuple(int(255 * m) for m in image_processor.image_mean)
        images = [pad_to_square(image, background) for image in images]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def pad_to_square(image, background):
    width, height = image.size
    if width == height:
        return image
    square = Image.new(image.mode, (max(width, height),) * 2, background)
    square.paste(image, ((max(width, height) - width) // 2, (max(width, height) - height) // 2))
    return square
