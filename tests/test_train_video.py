"""Training on a mixture of image and video records, end to end: 2 CPU ranks (gloo) under DeepSpeed
ZeRO-3, stage 1 in fp32 then stage 2 in bf16.

Every rank's batches have the same shapes and the same N and frame count M at every micro-step,
while the images and frames in them differ (a rank may hold no frame at all); M is drawn from
tokens.frame_counts as the sampler says; the frame end trains with the projector; the model
folder records how clips were sampled. A 2-rank run saved mid-epoch resumes on one rank and
consumes the rest of the epoch, video records included, exactly once."""

import collections
import json

import pytest
from safetensors import safe_open

from pipeline.model.vlm import TokenFlexVLM
from pipeline.train.sampler import TokenCountSampler
from tests.distributed import metrics, run_training
from tests.test_data_epochs import sample_key, samples_past_epoch_0, shard_keys
from tests.test_resume_world_size import cut_back, recorded_steps

pytestmark = pytest.mark.timeout(900)
COUNTS, FRAME_COUNTS = {16: 1, 64: 1}, {1: 1, 4: 1, 16: 1}
VIDEO = ["data.video_frames=4", f"tokens.counts={COUNTS}", f"tokens.frame_counts={FRAME_COUNTS}",
         "train.grad_accum=2"]


def shapes(folder):
    return [[json.loads(line) for line in (folder / f"rank-{r}.jsonl").read_text().splitlines()] for r in range(2)]


@pytest.fixture(scope="module")
def video_runs(tiny_models, clips, tmp_path_factory):
    """Stage 1 (fp32, 4 steps) and stage 2 from its folder (bf16, 3 steps), each recording every
    rank's batch shapes (tests/record_batch_shapes.py)."""
    root = tmp_path_factory.mktemp("video_runs")
    data = [f"data.shards={clips / 'shards'}", *VIDEO]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECORD_BATCH_SHAPES", str(root / "shapes1"))
        result = run_training("tiny_cpu_stage1.yaml", root / "stage1", f"model.vision_path={tiny_models / 'vision'}",
                              f"model.lm_path={tiny_models / 'qwen2'}", "train.max_steps=4", "train.save_every=4",
                              *data, module="tests.record_batch_shapes")
        assert result.returncode == 0, result.stderr[-3000:]
        patch.setenv("RECORD_BATCH_SHAPES", str(root / "shapes2"))
        result = run_training("tiny_cpu_stage2.yaml", root / "stage2", f"model.init_from={root / 'stage1' / 'final'}",
                              "train.max_steps=3", "train.save_every=3", "train.precision=bf16", *data,
                              module="tests.record_batch_shapes")
        assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.parametrize("stage, steps", [(1, 4), (2, 3)], ids=["stage1-fp32", "stage2-bf16"])
def test_every_rank_runs_the_same_shapes_and_counts_on_different_images_and_frames(video_runs, stage, steps):
    ranks = shapes(video_runs / f"shapes{stage}")
    assert len(ranks[0]) == len(ranks[1]) == 2 * steps  # two micro-batches a step
    sampler = TokenCountSampler(COUNTS, 0, FRAME_COUNTS)
    for index, (a, b) in enumerate(zip(*ranks)):
        # image_grids lists the real images and frames only: it shapes no tensor the model runs on
        a["shapes"].pop("image_grids"), b["shapes"].pop("image_grids")
        assert (a["n"], a["m"]) == (b["n"], b["m"]) == (sampler(index // 2), sampler.frame_count(index // 2))
        assert a["shapes"] == b["shapes"] and a["shapes"]["frame_mask"] == a["shapes"]["image_mask"]
    records = ranks[0] + ranks[1]
    assert any(a["frames"] != b["frames"] or a["images"] != b["images"] for a, b in zip(*ranks))
    assert any(r["frames"] > 0 and r["images"] > 0 for r in records)  # micro-batches mixing both


def test_video_training_logs_m_trains_the_frame_end_and_records_clip_sampling(video_runs, tiny_models):
    first, second = metrics(video_runs / "stage1"), metrics(video_runs / "stage2")
    sampler = TokenCountSampler(COUNTS, 0, FRAME_COUNTS)
    assert [m["num_frame_tokens"] for m in first] == [sampler.frame_count(step) for step in range(4)]
    assert len({m["num_frame_tokens"] for m in first}) > 1
    assert all(m["loss"] is not None and 0 < m["useful_flops"] < m["executed_flops"] for m in first + second)
    stage1 = TokenFlexVLM.from_pretrained(video_runs / "stage1" / "final")
    stage2 = TokenFlexVLM.from_pretrained(video_runs / "stage2" / "final")
    assert (stage1.image_processor.video_frames, stage1.image_processor.video_fps) == (4, 0.0)
    with safe_open(video_runs / "stage2" / "final" / "model.safetensors", "pt") as weights:
        assert "tile_layout.frame_end" in weights.keys()  # saved, not random-init on load
    assert not stage1.tile_layout.frame_end.detach().equal(stage2.tile_layout.frame_end.detach())


RECORDED_STEPS, RESUME_AT, PACK_WINDOW = 20, 2, 8


@pytest.fixture(scope="module")
def video_resume(tiny_models, clips, tmp_path_factory):
    """The samples of each step (tests/record_samples.py): 2 ranks on the clips' 120-sample epoch
    saving at step RESUME_AT, and a copy cut back there resumed on one rank to RECORDED_STEPS."""
    root = tmp_path_factory.mktemp("video_resume")
    overrides = [f"model.vision_path={tiny_models / 'vision'}", f"model.lm_path={tiny_models / 'qwen2'}",
                 f"data.shards={clips / 'shards'}", f"train.max_steps={RECORDED_STEPS}",
                 f"train.save_every={RESUME_AT}", f"train.keep_last={RECORDED_STEPS}",
                 f"data.pack_window={PACK_WINDOW}", *VIDEO[:3]]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECORD_SAMPLES", str(root / "two_ranks"))
        result = run_training("tiny_cpu_stage1.yaml", root / "run", *overrides, module="tests.record_samples")
        assert result.returncode == 0, result.stderr[-3000:]
        cut_back(root / "run", root / "resumed", RESUME_AT)
        patch.setenv("RECORD_SAMPLES", str(root / "one_rank"))
        result = run_training("tiny_cpu_stage1.yaml", root / "resumed", *overrides, ranks=1,
                              module="tests.record_samples")
        assert result.returncode == 0, result.stderr[-3000:]
    return root / "two_ranks", root / "one_rank"


def test_resume_on_one_rank_consumes_the_rest_of_an_epoch_with_video_records_once(video_resume, clips):
    two_ranks, one_rank = video_resume
    keys = shard_keys(str(clips / "shards"))
    records = json.loads((clips / "raw" / "data.json").read_text())
    assert len(keys) == len(records) == 120 and sum("video" in r for r in records) > 40
    before = [s for r in range(2) for step in recorded_steps(two_ranks / f"rank-{r}.jsonl")[:RESUME_AT] for s in step]
    assert {s[-1] for s in before} == {0} and 0 < len(before) < len(keys)  # saved mid-epoch
    after = [s for step in recorded_steps(one_rank / "rank-0.jsonl") for s in step]
    epoch_0 = collections.Counter(sample_key(s) for s in before + after if s[-1] == 0)
    assert set(epoch_0) == keys and set(epoch_0.values()) == {1}
    assert samples_past_epoch_0(after) >= 2 * PACK_WINDOW
