"""640x360 H.264 clips for the loader benchmark, made from the one photograph installed here
(matplotlib's sample portrait, as bench/photos.py uses it). Nothing is downloaded.

Each clip is a camera moving over a 4x4 mosaic of the photograph (bench/photos.py: mosaic): a
slow pan along a random straight path with a gentle zoom, SECONDS long at FPS, encoded with
PyAV's libx264 (preset medium, CRF 23, yuv420p, B-frames: x264's defaults) in MP4, with a
keyframe every `keyframe_seconds` (2 s, as streaming encoders set it; 0: x264's own default, a
keyframe every 250 frames or at a scene cut).
"""

import random
from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image

from bench.photos import mosaic
from tools.synthetic_clips import encode_mp4

WIDTH, HEIGHT, FPS, SECONDS = 640, 360, 30, 30
ENCODER = {"crf": "23", "preset": "medium"}  # a typical published clip's settings, x264's threads


def camera_frames(canvas: Image.Image, rng: random.Random, frames: int) -> list[np.ndarray]:
    """frames views of WIDTH x HEIGHT, panning in a straight line and zooming from 1x to 1.3x."""
    width, height = canvas.size
    start = np.array([rng.uniform(0, width / 3), rng.uniform(0, height / 3)])
    end = np.array([rng.uniform(width / 3, width - 1.3 * WIDTH), rng.uniform(height / 3, height - 1.3 * HEIGHT)])
    views = []
    for i in range(frames):
        t = i / max(1, frames - 1)
        x, y = start + t * (end - start)
        zoom = 1 + 0.3 * t
        box = (int(x), int(y), int(x + WIDTH * zoom), int(y + HEIGHT * zoom))
        views.append(np.asarray(canvas.crop(box).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)))
    return views


def write_clips(out_dir: Path, n: int, keyframe_seconds: float, seed: int = 0) -> list[str]:
    """n clips as out_dir/clip-<i>.mp4; returns their file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with cbook.get_sample_data("grace_hopper.jpg") as file:
        photo = Image.open(file).convert("RGB")
    names = []
    for i in range(n):
        canvas = mosaic(photo, 4, rng)
        names.append(f"clip-{i}.mp4")
        (out_dir / names[-1]).write_bytes(encode_mp4(camera_frames(canvas, rng, FPS * SECONDS), FPS, ENCODER,
                                                         keyframe_seconds))
    return names
