"""Serving clips: the token-budget rule, a clip's frames laid out with their frame ends at M,
tools.generate on a clip over frames x tokens per frame, tools.evaluate's sweep of frames x M on
held-out clips, and a model folder whose remote code samples a clip as the project does."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.model.images import tower_pixels
from pipeline.model.tiles import count_within_budget, frame_slots, marker_slots
from pipeline.model.video import decode_frames
from pipeline.model.vlm import TokenFlexVLM
from tools.synthetic_clips import QUESTIONS as QUESTION_TYPES

pytestmark = pytest.mark.timeout(600)
QUESTION = "Which way did the shape move?"


def test_token_budget_picks_the_largest_square_whose_slots_fit():
    frames = [(1, 1)] * 8
    assert count_within_budget(frames, [True] * 8, 2048, 27) == 225  # 8 x (225 + 1) = 1808; 256 would take 2056
    assert count_within_budget([(1, 1)] * 32, [True] * 32, 2048, 27) == 49  # 32 x 50 = 1600; 64 would take 2080
    image_and_clip = [(2, 2), *[(1, 1)] * 4]  # a 2 x 2 grid (4 tiles, a thumbnail, 2 row ends), 4 frames
    mask = [False] * 5 + [True] * 4
    assert count_within_budget(image_and_clip, mask, 1000, 27) == 100
    assert sum(marker_slots(image_and_clip, mask, 100)) == 5 * 100 + 2 + 4 * 101 == 906
    assert sum(marker_slots(image_and_clip, mask, 121)) == 5 * 121 + 2 + 4 * 122 == 1095
    assert count_within_budget(frames, [True] * 8, 10, 27) == 1  # not even N = 1 fits: 1
    assert count_within_budget(frames, [True] * 8, 10 ** 6, 16) == 256  # no larger than the tower's grid


@pytest.fixture(scope="module")
def model_dir(video_model):
    return video_model


@pytest.fixture(scope="module")
def clip(clips):
    record = next(r for r in json.loads((clips / "raw" / "data.json").read_text()) if "video" in r)
    return clips / "raw" / record["video"]


def test_a_clips_frames_fill_their_slots_in_time_order_each_with_a_frame_end(model_dir, clip, clips):
    model = TokenFlexVLM.from_pretrained(model_dir).eval()
    image = next((clips / "raw" / "images").glob("*.png"))
    from PIL import Image
    visuals = [Image.open(image).convert("RGB"), clip]
    sample = model.prepared_images(visuals)
    assert sample["frames_per_visual"] == [1, 4] and sample["frame_mask"].tolist() == [False] + [True] * 4
    with torch.no_grad():
        features = model.image_features(sample["pixel_values"])
        at_n, at_m = model.projector(features, 16), model.projector(features, 4)
        slots = model.tile_layout(at_n, sample["image_grids"], at_m, sample["frame_mask"])
    end = model.tile_layout.frame_end.detach()
    expected = torch.cat([at_n[0], *[torch.cat([at_m[i], end[None]]) for i in range(1, 5)]])
    assert torch.equal(slots, expected) and len(slots) == 16 + 4 * frame_slots(4)
    for frame, tile in zip(decode_frames(clip, 4), sample["pixel_values"][1:]):  # the clip's frames, in time order
        assert torch.equal(tower_pixels(frame, model.image_processor), tile)
    embeds, _ = model.inference_inputs([visuals], [QUESTION], 16, num_frame_tokens=4)
    assert embeds.shape[1] == len(model.prompt_ids(QUESTION, 2, [1, 4])) - 5 + len(slots)


def test_generate_answers_a_clip_over_frames_and_tokens_per_frame(model_dir, clip, capsys):
    from tools import generate

    assert generate.main([str(model_dir), "--video", str(clip), "--prompt", QUESTION, "--tokens", "16",
                          "--frames", "2,4", "--frame-tokens", "1,16", "--max-new-tokens", "4"]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert table[0][:4] == ["N", "frames", "M", "clip"]
    assert [row[:4] for row in table[1:]] == [["16", "2", "1", "4"], ["16", "2", "16", "34"],
                                              ["16", "4", "1", "8"], ["16", "4", "16", "68"]]
    model = TokenFlexVLM.from_pretrained(model_dir).eval()
    for row in table[1:]:
        frames, m = int(row[1]), int(row[2])
        expected = model.generate([clip], [QUESTION], 16, 4, num_frame_tokens=m, num_frames=frames)[0]
        assert " ".join(row[5:]) == (expected or "(empty)")
    assert generate.main([str(model_dir), "--video", str(clip), "--prompt", QUESTION, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == model.generate([clip], [QUESTION], 64, 4)[0]


def test_evaluate_sweeps_frames_and_tokens_per_frame_on_held_out_clips(model_dir, clips, tmp_path):
    from tools import evaluate

    out = tmp_path / "eval"
    assert evaluate.main([str(model_dir), "--shards", str(clips / "shards"), "--tokens", "16", "--frames", "2,4",
                          "--frame-tokens", "1,4", "--limit", "12", "--batch-size", "4", "--max-new-tokens", "2",
                          "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r["model"], r["num_frames"], r["num_frame_tokens"]) for r in results] == [
        ("chatty frames=2", 2, 1), ("chatty frames=2", 2, 4), ("chatty frames=4", 4, 1), ("chatty frames=4", 4, 4)]
    for r in results:  # every clip has 16 frames: F frames of M tokens and a frame end each
        assert r["vision_tokens_per_clip"] == r["num_frames"] * (r["num_frame_tokens"] + 1)
        assert r["vision_tokens_per_image"] in (None, 16) and r["samples"] == 12
    assert {p["question_type"] for p in results[0]["predictions"]} & set(QUESTION_TYPES)
    assert (out / "accuracy_vs_frames.png").stat().st_size > 0
    per_image = "-" if results[3]["vision_tokens_per_image"] is None else "16.0"
    assert f"| chatty frames=4 | 16 | 1 | {per_image} | 4 | 4 | 20.0 |" in (out / "results.md").read_text()


# Runs with `python -I` in an empty folder: neither this project's checkout nor PYTHONPATH is on sys.path.
CLIP_WITH_TRANSFORMERS = """
import importlib.util, sys
import torch
from transformers import AutoModel

assert importlib.util.find_spec("pipeline") is None, "the project is importable"
folder, clip, question, out_file = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    embeds, _ = model.inference_inputs([[clip]], [question], 16, num_frame_tokens=4)
answer = model.generate([clip], [question], num_vision_tokens=16, num_frame_tokens=4, max_new_tokens=6)
torch.save({"embeds": embeds, "answer": answer}, out_file)
"""


def test_remote_code_samples_a_clip_as_the_folder_records(model_dir, clip, tmp_path):
    result = subprocess.run([sys.executable, "-I", "-c", CLIP_WITH_TRANSFORMERS, str(model_dir), str(clip), QUESTION,
                             str(tmp_path / "out.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            check=False, env=os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    model = TokenFlexVLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        embeds, _ = model.inference_inputs([[clip]], [QUESTION], 16, num_frame_tokens=4)
    assert embeds.shape[1] > 4 * 5 and torch.equal(out["embeds"], embeds)  # the folder's 4 frames, sampled alike
    assert out["answer"] == model.generate([clip], [QUESTION], 16, 6, num_frame_tokens=4)
