"""Video data: which frames a clip gives (checked on clips whose frames show their own index, in
several containers), video records kept by tools.build_shards from each input form with their
bytes unchanged, bad videos skipped by their reasons, samples mixing a video and images decoded in
order, packed batches at N and a frame count M with the same shapes on every rank, and the
start-up check of data.seq_len against data.video_frames."""

import io
import json
import shutil

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from pipeline.data import TrainBatches, iter_samples
from pipeline.data.decode import measure_tower_inputs
from pipeline.data.mixture import load_mixture
from pipeline.model.chat import IMAGE_TOKEN, VIDEO_TAG, tokenize_record
from pipeline.model.tiles import frame_slots, image_slots, marker_slots, tile_count
from pipeline.model.video import ClipInfo, decode_frames, frame_indices, probe_clip, sample_count
from pipeline.run.config import DataConfig, load_config
from pipeline.train.preflight import check_inputs
from tests.distributed import REPO
from tools import build_shards

BITS = 8  # a frame's index, written as 8 columns, white for a 1 bit


def indexed_clip(frames, container="mp4", codec="libx264", fps=8, keyframe_every=5):
    """A clip whose frame i shows i in binary (BITS columns of 8 px, white for 1), with a keyframe
    every keyframe_every frames, so that sampling seeks."""
    out = io.BytesIO()
    with av.open(out, "w", format=container) as writer:
        stream = writer.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 8 * BITS, 32, "yuv420p"
        stream.codec_context.gop_size = keyframe_every
        for index in range(frames):
            pixels = np.zeros((32, 8 * BITS, 3), np.uint8)
            for bit in range(BITS):
                pixels[:, 8 * bit:8 * bit + 8] = 255 * (index >> bit & 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")):
                writer.mux(packet)
        for packet in stream.encode():
            writer.mux(packet)
    return out.getvalue()


def shown_index(frame):
    """The index an indexed_clip frame shows ((H, W, 3) uint8)."""
    return sum(int(frame[16, 8 * bit + 4, 0] > 127) << bit for bit in range(BITS))


def audio_only():
    """A WAV file: a container without a video stream."""
    out = io.BytesIO()
    with av.open(out, "w", format="wav") as writer:
        stream = writer.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            writer.mux(packet)
    return out.getvalue()


# ---- which frames a clip gives ----

def test_frame_indices_are_the_middles_of_equal_segments():
    assert frame_indices(16, 4) == [2, 6, 10, 14]
    assert frame_indices(50, 8) == [3, 9, 15, 21, 28, 34, 40, 46]
    assert frame_indices(5, 5) == [0, 1, 2, 3, 4]
    assert frame_indices(100, 1) == [50]
    assert sample_count(ClipInfo(50, 6.25), 8) == 8
    assert sample_count(ClipInfo(5, 0.6), 8) == 5  # a shorter clip gives all its frames
    assert sample_count(ClipInfo(50, 6.25), 8, max_fps=1.0) == 6  # at most one a second
    assert sample_count(ClipInfo(3, 0.3), 8, max_fps=1.0) == 1  # at least one


@pytest.mark.parametrize("container, codec", [("mp4", "libx264"), ("matroska", "libx264"), ("webm", "libvpx-vp9"),
                                              ("avi", "mpeg4")])
def test_decoded_frames_are_the_sampled_ones_in_every_container(container, codec):
    """Seeking to keyframes (one every 5 frames) and decoding on lands on exactly the sampled frames,
    in time order, the same on every read."""
    clip = indexed_clip(50, container, codec)
    assert probe_clip(clip) == ClipInfo(50, 6.25)
    for count in (1, 4, 8, 50):
        frames = decode_frames(clip, count)
        assert [shown_index(f.numpy()) for f in frames] == frame_indices(50, count)
        assert all(f.shape == (32, 64, 3) and f.dtype == torch.uint8 for f in frames)
    again = decode_frames(clip, 8)
    assert all(torch.equal(a, b) for a, b in zip(decode_frames(clip, 8), again))
    assert [shown_index(f.numpy()) for f in decode_frames(clip, 8, max_fps=1.0)] == frame_indices(50, 6)


def test_a_clip_that_is_not_one_says_why():
    for data, reason in [(b"not a video", "unreadable_video"), (indexed_clip(20)[:-300], "unreadable_video"),
                         (audio_only(), "no_video_stream")]:
        with pytest.raises(Exception) as error:
            probe_clip(data)
        assert getattr(error.value, "reason", None) == reason


# ---- shards ----

def video_record(i, path, text=f"{IMAGE_TOKEN}\nWhich way?", **extra):
    return {"id": f"v-{i}", "video": path, **extra,
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "left"}]}


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A folder of clips: ok-<i>.mp4 (20 + i frames), short.mp4 (4 frames), garbage.mp4, cut.mp4 (cut
    short), sound.wav (no video stream), and an image, red.png."""
    root = tmp_path_factory.mktemp("clip_files")
    for i in range(3):
        (root / f"ok-{i}.mp4").write_bytes(indexed_clip(20 + i))
    (root / "short.mp4").write_bytes(indexed_clip(4))
    (root / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really")
    (root / "cut.mp4").write_bytes(indexed_clip(20)[:-300])
    (root / "sound.wav").write_bytes(audio_only())
    from PIL import Image
    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "red.png")
    return root


def test_llava_video_records_are_kept_with_their_bytes_and_bad_videos_skipped_by_reason(clip_files, tmp_path):
    records = [video_record(0, "ok-0.mp4"),                                                     # LLaVA-Video's form
               video_record(1, "ok-1.mp4", text=f"{VIDEO_TAG}\nThen {IMAGE_TOKEN}\nWhich way?", image="red.png"),
               video_record(2, ["ok-2.mp4"]),                                                   # a list of one
               video_record(3, "absent.mp4"), video_record(4, "garbage.mp4"), video_record(5, "cut.mp4"),
               video_record(6, "sound.wav"), video_record(7, "short.mp4"),
               video_record(8, ["ok-0.mp4", "ok-1.mp4"]),
               video_record(9, "ok-0.mp4", text="Which way?"),                                  # no tag
               video_record(10, "ok-0.mp4", text=f"{IMAGE_TOKEN}\nWhich way?", image="red.png")]  # video untagged
    (tmp_path / "data.json").write_text(json.dumps(records))
    manifest = build_shards.build(str(tmp_path / "data.json"), str(clip_files), str(tmp_path / "out"))
    assert manifest["total_samples"] == 3 and manifest["total_videos"] == 3
    skipped = {reason: count for reason, count in manifest["skipped"].items() if count}
    assert skipped == {"unreadable_video": 3, "no_video_stream": 1, "too_few_frames": 1, "several_videos": 1,
                       "image_tag_mismatch": 2}
    assert manifest["skipped_examples"]["unreadable_video"] == ["v-3", "v-4", "v-5"]
    assert manifest["skipped_examples"]["no_video_stream"] == ["v-6"]
    assert manifest["skipped_examples"]["too_few_frames"] == ["v-7"]
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    for sample, index in zip(samples, range(3)):
        record = json.loads(sample["json"])
        assert sample["mp4"] == (clip_files / f"ok-{index}.mp4").read_bytes()  # stored unchanged
        assert record["video"] == f"ok-{index}.mp4" and record["video_info"] == {"frames": 20 + index,
                                                                                "seconds": (20 + index) / 8}
        assert "".join(t["value"] for t in record["conversations"]).count(VIDEO_TAG) == 1
    assert json.loads(samples[0]["json"])["conversations"][0]["value"] == f"{VIDEO_TAG}\nWhich way?"
    assert samples[1]["png"] == (clip_files / "red.png").read_bytes()
    # fewer frames required: the short clip is kept
    kept = build_shards.build(str(tmp_path / "data.json"), str(clip_files), str(tmp_path / "short"),
                              min_video_frames=4)
    assert kept["total_samples"] == 4 and kept["skipped"]["too_few_frames"] == 0


def test_every_input_form_of_a_video_gives_the_same_shards(clip_files, tmp_path):
    """LLaVA-Video JSON; parquet rows with the video as bytes, as a path, as a datasets struct; the
    messages schema with a <video> tag and `videos`, and with typed video parts: the same shards."""
    question = "Which way?"
    json_records = [video_record(i, f"ok-{i}.mp4", text=f"{IMAGE_TOKEN}\n{question}") for i in range(3)]
    (tmp_path / "data.json").write_text(json.dumps(json_records))
    build_shards.build(str(tmp_path / "data.json"), str(clip_files), str(tmp_path / "expected"))
    answer = {"role": "assistant", "content": "left"}
    forms = {
        "bytes": [{**r, "video": {"bytes": (clip_files / r["video"]).read_bytes(), "path": r["video"]}}
                  for r in json_records],
        "paths": json_records,
        "messages": [{"id": r["id"], "videos": [r["video"]], "messages": [
            {"role": "user", "content": f"{VIDEO_TAG}\n{question}"}, answer]} for r in json_records],
        "typed": [{"id": r["id"], "messages": [
            {"role": "user", "content": [{"type": "video", "video": r["video"]}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": "left"}]}]} for r in json_records],
    }
    for name, rows in forms.items():
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
        build_shards.build(str(tmp_path / f"{name}.parquet"), str(clip_files), str(tmp_path / name))
        assert (tmp_path / name / "shard-000000.tar").read_bytes() == \
            (tmp_path / "expected" / "shard-000000.tar").read_bytes(), name


# ---- decoding and batches ----

@pytest.fixture(scope="module")
def mixed_record(clip_files, tmp_path_factory):
    """Shards of one record mixing an image, the video and another image, in that order."""
    root = tmp_path_factory.mktemp("mixed")
    for name in ("ok-1.mp4", "red.png"):
        shutil.copy(clip_files / name, root)
    record = video_record(0, "ok-1.mp4", image=["red.png", "red.png"],
                          text=f"{IMAGE_TOKEN}\n{VIDEO_TAG}\n{IMAGE_TOKEN}\nWhich way?")
    (root / "data.json").write_text(json.dumps([record]))
    build_shards.build(str(root / "data.json"), str(root), str(root / "shards"))
    return root


def test_a_record_mixing_images_and_a_video_decodes_in_text_order(mixed_record, models):
    tokenizer, processor = models
    processor.video_frames = 4
    try:
        (sample,) = iter_samples(str(mixed_record / "shards"), tokenizer, processor)
    finally:
        del processor.video_frames
    marker = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert sample["input_ids"].count(marker) == 1 + 4 + 1 == sample["prompt_ids"].count(marker)
    assert [tuple(g) for g in sample["image_grids"]] == [(1, 1)] * 6
    assert sample["frame_mask"].tolist() == [False, True, True, True, True, False]
    pixels = sample["pixel_values"]
    assert pixels.shape == (6, 3, 64, 64)
    assert torch.equal(pixels[0], pixels[5]) and not torch.equal(pixels[0], pixels[1])
    frames = decode_frames(mixed_record / "ok-1.mp4", 4)
    assert [shown_index(f.numpy()) for f in frames] == frame_indices(21, 4)
    from pipeline.model.images import tower_pixels
    for frame, tile in zip(frames, pixels[1:5]):
        assert torch.equal(tower_pixels(frame, processor), tile)  # prepared as a single-tile image
    assert marker_slots(sample["image_grids"], sample["frame_mask"], 16, 4) == [16, 5, 5, 5, 5, 16]


def test_the_tile_budget_counts_frames_from_the_records_without_reading_clips(clips, models, tmp_path):
    """Text tokens per tower input and the frames' share of the inputs, measured as training
    measures them (from each record's video_info, frame ends counted as text), equal their count
    over every record; the clips are never read."""
    tokenizer = models[0]
    text = tiles = frames = 0
    for record in json.loads((clips / "raw" / "data.json").read_text()):
        images, video = len([record["image"]] if "image" in record else []), "video" in record
        count = sample_count(probe_clip(clips / "raw" / record["video"]), 4) if video else 0
        text += len(tokenize_record(record, tokenizer, images + video)[0]) - images - video + count * frame_slots(0)
        tiles, frames = tiles + images, frames + count
    assert frames > 0 and tiles > 0
    shards = shutil.copytree(clips / "shards", tmp_path / "shards")
    for tar in shards.glob("shard-*.tar"):  # the clips' bytes gone: the measure reads the records alone
        samples = list(wds.WebDataset(str(tar), shardshuffle=False))
        with wds.TarWriter(str(tar)) as writer:
            for sample in samples:
                writer.write({k: (b"" if k == "mp4" else v) for k, v in sample.items()
                              if k not in ("__url__", "__local_path__")})
    measured = measure_tower_inputs(load_mixture(str(shards)), tokenizer, video_sampling=(4, 0.0))
    assert measured.text_per_input == pytest.approx(text / (tiles + frames))
    assert measured.frame_share == pytest.approx(frames / (tiles + frames))


def check_video_batch(batch, n, m, image_id):
    """The batch's slots are its images' at N and its frames' at M (plus a frame end each)."""
    grids, frames = batch["image_grids"].tolist(), batch["frame_mask"]
    expected = sum(image_slots(g, n) for g, is_frame in zip(grids, frames.tolist()) if not is_frame)
    expected += int(frames.sum()) * frame_slots(m)
    assert int((batch["input_ids"] == image_id).sum()) == expected
    assert int(batch["image_mask"].sum()) == sum(map(tile_count, grids)) == batch["stats"]["num_tiles"]
    assert int(frames.sum()) == batch["stats"]["num_frames"]
    assert not (frames & ~batch["image_mask"]).any()  # frames are real tiles


def test_video_batches_have_the_same_shapes_on_every_rank_at_each_n_and_m(clips, models):
    image_id = models[0].convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = DataConfig(shards=str(clips / "shards"), seq_len=1024, rows_per_batch=2, num_workers=1, video_frames=4)
    ranks = [TrainBatches(cfg, *models, rank=r, world_size=2) for r in range(2)]
    assert 0.3 < ranks[0].frame_share < 0.95 and ranks[0].frame_share == ranks[1].frame_share
    seen = set()
    for n, m in [(16, 4), (64, 16), (16, 64), (64, 1)]:
        a, b = (loader.next_batch(n, m) for loader in ranks)
        for key in ["input_ids", "labels", "position_ids", "pixel_values", "image_mask", "frame_mask"]:
            assert a[key].shape == b[key].shape, (n, m, key)
        assert a["pixel_values"].shape[0] == ranks[0].tile_budget(n, m) == ranks[1].tile_budget(n, m)
        for batch in (a, b):
            check_video_batch(batch, n, m, image_id)
            seen.add((batch["stats"]["num_images"] > 0, batch["stats"]["num_frames"] > 0))
    assert (True, True) in seen  # batches mixing images and frames
    # frames at fewer tokens than images leave room for more tower inputs
    assert ranks[0].tile_budget(64, 4) > ranks[0].tile_budget(64) > ranks[0].tile_budget(64, 144)


def test_seq_len_without_room_for_the_video_frames_fails_at_start(tiny_models, clips, synthetic_shards, tmp_path):
    base = [f"model.vision_path={tiny_models / 'vision'}", f"model.lm_path={tiny_models / 'qwen2'}",
            f"train.output_dir={tmp_path / 'run'}", "data.seq_len=1024"]
    cfg = load_config(REPO / "configs" / "tiny_cpu_stage1.yaml", [*base, f"data.shards={clips / 'shards'}"])
    with pytest.raises(ValueError) as error:
        check_inputs(cfg)
    assert str(error.value) == (
        "data.seq_len=1024 can't hold a video with its text at M=144: it must be at least data.video_frames=8 frames "
        "x (max(tokens.frame_counts) + a frame end) + a minimum of text = 1160 + 64 = 1224; data.shards holds video")
    check_inputs(load_config(REPO / "configs" / "tiny_cpu_stage1.yaml",
                             [*base, f"data.shards={clips / 'shards'}", "data.video_frames=4"]))
    check_inputs(load_config(REPO / "configs" / "tiny_cpu_stage1.yaml",  # images alone: no video to hold
                             [*base, f"data.shards={synthetic_shards}"]))
