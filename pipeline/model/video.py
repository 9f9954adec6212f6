"""Video clips as frames for the vision tower: which frames to sample, and decoding them with PyAV.

Model folders carry this module as transformers remote code (see vlm.py): generation samples a
clip's frames as training did. PyAV (FFmpeg's libraries, bundled in its wheel) is imported only
when a clip is read, so a folder serving images alone does not need it.

Which frames: a clip of `total` frames gives count = min(max_frames, total, floor(seconds x
max_fps) when max_fps > 0), at least 1; frame k of count is the clip's frame
floor((2k + 1) x total / (2 x count)), the middle one of count equal segments (frame_indices):
uniform over the clip, deterministic, the same in training, evaluation and generation.

How they are read: one demuxing pass (no decoding) lists every packet's presentation timestamp
and which packets are keyframes; frame i is the i-th timestamp in presentation order, so
variable frame rates and B-frames count right. Each wanted frame is then reached by decoding on
from the last one read, or, when a keyframe lies between them, by seeking to the last keyframe at
or before it: a clip is decoded from at most one keyframe per wanted frame, never whole unless
its frames are that dense.

A clip's record (tools.build_shards) stores its frame count and length (ClipInfo), so the
loader's tile budget can count frames without reading clips (pipeline/data/decode.py).
"""

import io
import math
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import; PyAV is optional
    import av
    from transformers.image_processing_utils import BaseImageProcessor

VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "mov", "avi", "m4v", "mpeg", "mpg", "ts", "flv", "vid")  # vid: unknown
DEFAULT_FRAMES = 8  # data.video_frames' default, and what a folder written before video samples


class VideoError(Exception):
    """A clip that can't give frames; reason is tools.build_shards' skip reason: unreadable_video
    (not a container PyAV reads, or no frame decodes) or no_video_stream."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ClipInfo:
    """A clip's frame count (its video packets with a timestamp) and length in seconds."""

    frames: int
    seconds: float


@dataclass(frozen=True)
class ClipIndex:
    """What one demuxing pass tells of a clip's first video stream: each frame's presentation
    timestamp in order, the keyframes' timestamps in order, and its ClipInfo."""

    timestamps: list[int]
    keyframes: list[int]
    info: ClipInfo


def sample_count(info: ClipInfo, max_frames: int, max_fps: float = 0.0) -> int:
    """Frames to sample from a clip: max_frames, fewer when the clip has fewer or when max_fps
    (> 0) allows fewer over its length; at least 1."""
    count = min(max_frames, info.frames)
    if max_fps > 0:
        count = min(count, math.floor(info.seconds * max_fps))
    return max(1, count)


def frame_indices(total: int, count: int) -> list[int]:
    """The middle frame of each of `count` equal segments of a clip of `total` frames."""
    return [(2 * k + 1) * total // (2 * count) for k in range(count)]


def _open(source: bytes | str | Path) -> "av.container.InputContainer":
    import av

    try:
        return av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source))
    except (av.FFmpegError, OSError, ValueError) as error:  # a missing file, bytes no demuxer takes
        raise VideoError("unreadable_video", f"not a video PyAV can open ({error})") from None


def _index(container: "av.container.InputContainer") -> ClipIndex:
    import av

    if not container.streams.video:
        raise VideoError("no_video_stream", "the file holds no video stream")
    stream = container.streams.video[0]
    try:
        packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream) if packet.pts is not None]
    except av.FFmpegError as error:  # a container cut short
        raise VideoError("unreadable_video", f"its packets can't be read ({error})") from None
    timestamps = sorted(pts for pts, _ in packets)
    if not timestamps:
        raise VideoError("unreadable_video", "its video stream holds no frame")
    rate = stream.average_rate
    seconds = (len(timestamps) / float(rate) if rate else
               float((timestamps[-1] - timestamps[0]) * stream.time_base) if len(timestamps) > 1 else 0.0)
    keyframes = sorted(pts for pts, key in packets if key) or timestamps[:1]
    return ClipIndex(timestamps, keyframes, ClipInfo(len(timestamps), seconds))


def _frames_at(container: "av.container.InputContainer", index: ClipIndex,
               wanted: list[int]) -> Iterator[tuple[int, "av.VideoFrame"]]:
    """(timestamp, decoded frame) for each wanted timestamp (in increasing order): the first frame
    at or after it."""
    import av

    stream = container.streams.video[0]
    decoded, last = None, None  # the decoder's frames, and the timestamp of the last one it gave
    try:
        for target in wanted:
            keyframe = index.keyframes[max(0, bisect_right(index.keyframes, target) - 1)]
            if last is None or keyframe > last:  # a keyframe lies between: seeking decodes less
                container.seek(keyframe, stream=stream, backward=True)
                decoded = container.decode(stream)
            for frame in decoded:
                last = frame.pts
                if frame.pts is not None and frame.pts >= target:
                    yield target, frame
                    break
            else:
                raise VideoError("unreadable_video", f"the frame at timestamp {target} does not decode")
    except av.FFmpegError as error:
        raise VideoError("unreadable_video", f"decoding failed ({error})") from None


def probe_clip(source: bytes | str | Path) -> ClipInfo:
    """A clip's ClipInfo once its packets demux and its first and last frames decode (what
    tools.build_shards validates: a clip cut short fails); VideoError otherwise."""
    with _open(source) as container:
        index = _index(container)
        for _ in _frames_at(container, index, sorted({index.timestamps[0], index.timestamps[-1]})):
            pass
        return index.info


def decode_frames(source: bytes | str | Path, max_frames: int, max_fps: float = 0.0) -> list[torch.Tensor]:
    """A clip's sampled frames (see the module docstring) as (H, W, 3) uint8 RGB, in time order;
    VideoError when the clip can't give them."""
    with _open(source) as container:
        index = _index(container)
        picks = frame_indices(index.info.frames, sample_count(index.info, max_frames, max_fps))
        wanted = [index.timestamps[i] for i in picks]  # distinct and increasing: count <= frames
        return [torch.from_numpy(frame.to_ndarray(format="rgb24")) for _, frame in _frames_at(container, index, wanted)]


def set_video_sampling(image_processor: "BaseImageProcessor", max_frames: int, max_fps: float) -> None:
    """Record data.video_frames and data.video_fps on the image processor: model folders save them
    with it (preprocessor_config.json), so evaluation, generation and remote code sample clips as
    training did."""
    image_processor.video_frames, image_processor.video_fps = max_frames, max_fps


def recorded_video_sampling(image_processor: "BaseImageProcessor", max_frames: int | None = None,
                            max_fps: float | None = None) -> tuple[int, float]:
    """(max_frames, max_fps): the given ones, else the processor's recorded ones (for folders written
    before video: DEFAULT_FRAMES and no fps limit, 0)."""
    return (max_frames or getattr(image_processor, "video_frames", DEFAULT_FRAMES),
            float(getattr(image_processor, "video_fps", 0.0) if max_fps is None else max_fps))
