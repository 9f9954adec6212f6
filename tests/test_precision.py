"""bf16, what a GPU run trains in by default (train.precision: auto), run on CPU end to end.

Both stages train in bf16 on 2 ranks (DeepSpeed ZeRO-3 on gloo) through tests/record_dtypes.py,
which records what each rank's engine holds; stage 2's checkpoint is converted to a bf16 model
folder and evaluated in bf16. Stage 1 is the case that needs care: its vision tower and LM are
created in bf16 by zero.Init, its projector outside it (pipeline/engine/engine.py: cast_parameters).
"""

import json
import math

import pytest

from tests.distributed import metrics, run_training, stage1_overrides
from tools import convert_checkpoint, evaluate

pytestmark = pytest.mark.timeout(600)
BF16 = ["train.precision=bf16"]


@pytest.fixture(scope="module")
def bf16_runs(tiny_models, synthetic_shards, tmp_path_factory):
    """{"stage1": output_dir, "stage2": output_dir}: stage 1 (16 steps), then 6 steps of stage 2
    from its final/ folder, both in bf16."""
    root = tmp_path_factory.mktemp("bf16")
    stages = {"stage1": ("tiny_cpu_stage1.yaml", stage1_overrides(tiny_models, synthetic_shards)),
              "stage2": ("tiny_cpu_stage2.yaml", [f"model.init_from={root / 'stage1' / 'final'}",
                                                  f"data.shards={synthetic_shards}", "train.max_steps=6",
                                                  "optim.lr=1e-3", "data.seq_len=512"])}
    for name, (config, overrides) in stages.items():
        result = run_training(config, root / name, *overrides, *BF16, module="tests.record_dtypes")
        assert result.returncode == 0, result.stderr[-3000:]
    return {name: root / name for name in stages}


@pytest.mark.parametrize("stage, trained", [("stage1", {"projector", "tile_layout"}),
                                            ("stage2", {"projector", "tile_layout", "language_model"})])
def test_engine_holds_every_parameter_in_bf16_with_fp32_masters_and_accumulation(bf16_runs, stage, trained):
    for rank in (0, 1):
        record = json.loads((bf16_runs[stage] / "engine_dtypes" / f"rank-{rank}.json").read_text())
        parameters = record["parameters"]
        assert {name.split(".")[0] for name, p in parameters.items() if p["trains"]} == trained
        assert any(not p["trains"] for p in parameters.values())
        elsewhere = {name: p for name, p in parameters.items() if (p["dtype"], p["device"]) != ("torch.bfloat16", "cpu")}
        assert elsewhere == {}, f"rank {rank}"
        assert record["buffers"] and set(record["buffers"].values()) == {"cpu"}
        assert record["master_weights"] == ["torch.float32"]
        assert record["grad_accum"] == "torch.float32"  # DeepSpeed's default under bf16 is bf16


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_each_stage_loads_the_tower_and_the_lm_straight_into_zero3_partitions(bf16_runs, stage):
    """Stage 1 from the HF checkpoints, stage 2 from stage 1's model folder: no rank ever holds the
    whole tower or LM; the projector and the tile layout, small, are partitioned by DeepSpeed."""
    for rank in (0, 1):
        parameters = json.loads((bf16_runs[stage] / "engine_dtypes" / f"rank-{rank}.json").read_text())["parameters"]
        partitioned = {name.split(".")[0] for name, p in parameters.items() if p["partitioned_at_build"]}
        whole = {name.split(".")[0] for name, p in parameters.items() if not p["partitioned_at_build"]}
        assert (partitioned, whole) == ({"vision_tower", "language_model"}, {"projector", "tile_layout"}), f"rank {rank}"


@pytest.mark.parametrize("stage, window", [("stage1", 3), ("stage2", 2)])
def test_bf16_loss_is_finite_and_falls(bf16_runs, stage, window):
    losses = [m["loss"] for m in metrics(bf16_runs[stage])]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-window:]) / window < sum(losses[:window]) / window


def test_each_stage_logs_its_dtypes_once(bf16_runs):
    for stage, lm in (("stage1", "frozen"), ("stage2", "trains")):
        log = (bf16_runs[stage].parent / f"{stage}.log").read_text()
        assert log.count("dtypes (train.precision=bf16):") == 1
        for line in ("vision_tower     frozen weights bfloat16", f"language_model   {lm} weights bfloat16",
                     "projector        trains weights bfloat16",
                     "optimizer        master weights float32, gradients accumulated in float32"):
            assert line in log, f"{stage}: {line}"


def test_bf16_checkpoint_converts_to_a_bf16_folder_that_evaluates_in_bf16(bf16_runs, synthetic_shards, tmp_path):
    assert convert_checkpoint.main([str(bf16_runs["stage2"]), str(tmp_path / "model"), "--dtype", "bf16"]) == 0
    assert evaluate.main([str(tmp_path / "model"), "--shards", str(synthetic_shards), "--tokens", "16,64",
                          "--limit", "8", "--dtype", "bf16", "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert [(r["num_vision_tokens"], r["dtype"]) for r in results] == [(16, "bfloat16"), (64, "bfloat16")]
    assert all(math.isfinite(r["loss"]) for r in results)
