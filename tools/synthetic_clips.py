"""Short synthetic video clips whose questions need more than one frame (tools.make_synthetic --video-fraction).

A clip is FRAMES frames at FPS (2 s): one large shape on a background, moving straight across the
picture (left, right, up or down), its colour changing 0 to 3 times. Its questions
(question_type):

    video_first      What colour was the shape at the start?   the colour before the first change
    video_last       What colour was the shape at the end?     the colour after the last change
    video_direction  Which way did the shape move?             left, right, up or down
    video_changes    How many times did the shape change colour?   0, 1, 2 or 3

Colour changes fall in frames FIRST_CHANGE..LAST_CHANGE, at least two frames apart, so that the
first and last colours hold over the clip's first and last quarters and every colour lasts at
least two frames. What the sampled frames (pipeline/model/video.py: the middle frame of each of F
equal segments) can tell: one frame, neither colour nor direction (it is mid-clip); two frames,
the first and last colours and, with a few tokens per frame, the direction; every change only
from 8 frames on (every pair of consecutive frames holds one of the 8 sampled). The direction
needs a frame's tokens to keep where the shape is, which one token (M = 1: the frame's mean)
does not. So frames and tokens per frame buy different answers under one budget.

Clips are H.264 in MP4 (PyAV's libx264, single-threaded: the same bytes every run), the form
LLaVA-Video's data has; records place them with an <image> tag and "video", as LLaVA-Video-178K's do.
"""

import io
import random
from collections.abc import Callable

import av
import numpy as np
from PIL import Image, ImageDraw

FRAMES, FPS = 16, 8
FIRST_CHANGE, LAST_CHANGE = 5, 12  # frames a colour change may fall on (the frame showing the new colour)
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTIONS = {
    "video_first": "What colour was the shape at the start?",
    "video_last": "What colour was the shape at the end?",
    "video_direction": "Which way did the shape move?",
    "video_changes": "How many times did the shape change colour?",
}


def draw_clip(rng: random.Random, size: int, backgrounds: list[str], colours: list[str]) -> dict:
    """One random clip's description: background, shape, side, direction, start and the colour of each frame."""
    changes = rng.randrange(4)
    while True:  # change frames at least two apart
        at = sorted(rng.sample(range(FIRST_CHANGE, LAST_CHANGE + 1), changes))
        if all(b - a >= 2 for a, b in zip(at, at[1:])):
            break
    palette, colour = [], rng.choice(colours)
    for frame in range(FRAMES):
        if frame in at:
            colour = rng.choice([c for c in colours if c != colour])
        palette.append(colour)
    side = size * 3 // 8
    direction = rng.choice(sorted(DIRECTIONS))
    travel = size - side - 2  # from one edge to the other
    dx, dy = DIRECTIONS[direction]
    across = rng.randrange(1, size - side - 1)  # the position on the axis it does not move along
    start = (1 if dx > 0 else 1 + travel if dx < 0 else across, 1 if dy > 0 else 1 + travel if dy < 0 else across)
    return {"background": rng.choice(backgrounds), "shape": rng.choice(["circle", "square", "triangle"]), "side": side,
            "size": size, "direction": direction, "start": start, "travel": travel, "colours": palette}


def facts(clip: dict) -> dict:
    """Each question type's answer."""
    colours = clip["colours"]
    return {"video_first": colours[0], "video_last": colours[-1], "video_direction": clip["direction"],
            "video_changes": str(sum(a != b for a, b in zip(colours, colours[1:])))}


def render_frames(clip: dict, background_rgb: dict, colour_rgb: dict, draw_shape: Callable) -> list[np.ndarray]:
    """The clip's frames as (size, size, 3) uint8 RGB."""
    dx, dy = DIRECTIONS[clip["direction"]]
    frames = []
    for index, colour in enumerate(clip["colours"]):
        step = round(clip["travel"] * index / (FRAMES - 1))
        x, y = clip["start"][0] + dx * step, clip["start"][1] + dy * step
        image = Image.new("RGB", (clip["size"], clip["size"]), background_rgb[clip["background"]])
        draw_shape(ImageDraw.Draw(image), clip["shape"], (x, y, clip["side"]), colour_rgb[colour])
        frames.append(np.asarray(image))
    return frames


def encode_mp4(frames: list[np.ndarray], fps: int = FPS, options: dict | None = None,
               keyframe_seconds: float = 0.0) -> bytes:
    """H.264 in MP4 (yuv420p; options: the encoder's, by default CRF 12 on one encoder thread;
    keyframe_seconds > 0: a keyframe that often, else x264's default). Frames are converted to yuv420p
    before the encoder sees them: handing it RGB frames gave other bytes now and then (measured: 3 of 10
    clips over 8 encodings), converted ones the same bytes every time (150 of 150)."""
    out = io.BytesIO()
    height, width, _ = frames[0].shape
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options or {"crf": "12", "threads": "1"}
        if keyframe_seconds:
            stream.codec_context.gop_size = round(keyframe_seconds * fps)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()
