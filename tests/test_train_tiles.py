"""Training with tiles on multi-image data, end to end: 2 CPU ranks (gloo) under DeepSpeed ZeRO-3.

Every rank's batches have the same shapes at every step, while the real images and tiles in
them differ; stage 1 then stage 2 train; the model folder records the tiling."""

import json

import pytest

from pipeline.model.vlm import TokenFlexVLM
from tests.distributed import metrics, run_training

pytestmark = pytest.mark.timeout(600)
TILED = ["data.max_tiles=4", "data.multi_image_max_tiles=2", "data.seq_len=1024", "tokens.counts={16: 1, 64: 1}"]


@pytest.fixture(scope="module")
def tiled_stage1(tiny_models, tiled, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled_stage1") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECORD_BATCH_SHAPES", str(out.parent / "shapes"))
        result = run_training("tiny_cpu_stage1.yaml", out, f"model.vision_path={tiny_models / 'vision'}",
                              f"model.lm_path={tiny_models / 'qwen2'}", f"data.shards={tiled / 'shards'}",
                              "train.max_steps=6", "train.save_every=6", *TILED, module="tests.record_batch_shapes")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_every_rank_runs_the_same_shapes_on_different_tiles(tiled_stage1):
    ranks = [
        [json.loads(line) for line in (tiled_stage1.parent / "shapes" / f"rank-{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 6
    for a, b in zip(*ranks):
        # image_grids lists the real images only: it shapes no tensor the model runs on
        a["shapes"].pop("image_grids"), b["shapes"].pop("image_grids")
        assert a["n"] == b["n"] and a["shapes"] == b["shapes"]
    assert any(a["grids"] != b["grids"] for a, b in zip(*ranks))  # the same shapes hold other images and grids
    grids = [tuple(g) for record in ranks[0] + ranks[1] for g in record["grids"]]
    assert any(rows * cols > 1 for rows, cols in grids) and (1, 1) in grids
    assert any(record["images"] > 1 and record["tiles"] > record["images"] for record in ranks[0] + ranks[1])


def test_tiled_training_learns_and_its_folder_records_the_tiling(tiled_stage1, tiny_models, tiled,
                                                                 tmp_path_factory):
    steps = metrics(tiled_stage1)
    assert len(steps) == 6 and all(m["dummy_image_fraction"] < 0.5 for m in steps)
    model = TokenFlexVLM.from_pretrained(tiled_stage1 / "final")
    assert (model.image_processor.max_tiles, model.image_processor.multi_image_max_tiles) == (4, 2)
    card = (tiled_stage1 / "final" / "README.md").read_text()
    assert "| images | tiles of 64×64 px: up to 4 per image (2 in samples of several images) and a thumbnail" in card
    row_end = model.tile_layout.row_end.detach().clone()
    out = tmp_path_factory.mktemp("tiled_stage2") / "run"
    result = run_training("tiny_cpu_stage2.yaml", out, f"model.init_from={tiled_stage1 / 'final'}",
                          f"data.shards={tiled / 'shards'}", "train.max_steps=3", "train.save_every=3", *TILED)
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = TokenFlexVLM.from_pretrained(out / "final")
    assert not row_end.equal(tuned.tile_layout.row_end.detach())  # row ends train with the projector


def test_evaluate_sweeps_tiles_and_n_and_plots_accuracy_against_vision_tokens(tiled_stage1, tiled, tmp_path):
    from tools import evaluate

    out = tmp_path / "eval"
    assert evaluate.main([str(tiled_stage1 / "final"), "--shards", str(tiled / "shards"), "--tokens", "16,64",
                          "--tiles", "1,4", "--limit", "12", "--batch-size", "4", "--max-new-tokens", "2",
                          "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r["model"], r["num_tiles"], r["num_vision_tokens"]) for r in results] == [
        ("final tiles=1", 1, 16), ("final tiles=1", 1, 64), ("final tiles=4", 4, 16), ("final tiles=4", 4, 64)]
    per_image = {(r["num_tiles"], r["num_vision_tokens"]): r["vision_tokens_per_image"] for r in results}
    assert per_image[1, 16] == 16 and per_image[1, 64] == 64  # one tile: N slots per image
    assert per_image[4, 16] > 16 and per_image[4, 64] > 64  # wide and tall scenes take 4 tiles + thumbnail
    assert (out / "accuracy_vs_tiles.png").stat().st_size > 0
    assert "| final tiles=4 | 64 | 4 |" in (out / "results.md").read_text()


def test_generate_answers_a_prompt_with_two_images_at_a_tile_limit(tiled_stage1, tiled, capsys):
    from tools import generate

    raw = tiled / "raw"
    record = next(r for r in json.loads((raw / "data.json").read_text()) if isinstance(r.get("image"), list))
    images = [str(raw / path) for path in record["image"]]
    assert generate.main([str(tiled_stage1 / "final"), "--image", images[0], "--image", images[1],
                          "--prompt", "Which is larger?", "--tokens", "16,64", "--tiles", "2",
                          "--max-new-tokens", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["N", "prefill", "ms"] and [line.split()[0] for line in table[1:]] == ["16", "64"]
