"""bf16, what a GPU run trains in by default (train.precision: auto), run on CPU end to end.

Both stages train in bf16 on 2 ranks (DeepSpeed ZeRO-3 on gloo) through tests/record_dtypes.py,
which records what each rank's engine holds; stage 2's checkpoint is converted to a bf16 model
folder and evaluated in bf16. Stage 1 is the case that needs care: its vision tower and LM are
created in bf16 by zero.Init, its projector outside it (pipeline/engine/engine.py: cast_parameters).
Gradient accumulation over micro-batches (train.grad_accum=2) runs on a spawned 1-rank engine.
"""

import json
import math
import os

import deepspeed
import pytest
import torch
import torch.multiprocessing as mp
from deepspeed.utils import safe_get_full_grad

from pipeline.engine.engine import build_engine
from pipeline.run.config import load_config
from pipeline.train.step import train_step
from stages import STAGES
from tests.distributed import REPO, metrics, run_training, stage1_overrides
from tests.test_step_loss import FEW, MANY, Batches, N, batch, build_model, make_rows
from tools import convert_checkpoint, evaluate
from tools.demo import free_port

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
        elsewhere = {
            name: p for name, p in parameters.items() if (p["dtype"], p["device"]) != ("torch.bfloat16", "cpu")
        }
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
        assert (partitioned, whole) == ({"vision_tower", "language_model"}, {"projector", "tile_layout"}), (
            f"rank {rank}"
        )


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


def gradients_after_each_micro_batch(tiny_models, rows):
    """One optimizer step of stage 2 (projector and LM train) in bf16 with train.grad_accum=2, on a
    ZeRO-3 engine through pipeline.train.step.train_step, the two rows (make_rows' indices) as its
    micro-batches. Returns the full gradients of the trained parameters read after each
    micro-batch's backward (ZeRO-3's gradient partitions, gathered; after the second, what the
    optimizer steps with) and the dtype of the partitions."""
    cfg = load_config(REPO / "configs" / "tiny_cpu_stage2.yaml", [
        "data.rows_per_batch=1", "train.grad_accum=2", "optim.grad_clip=0.0", *BF16])
    model = build_model(tiny_models)
    STAGES["finetune"].freeze_backbones(model, cfg)
    engine = build_engine(model, STAGES["finetune"].param_groups(model, cfg), cfg)
    trained = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    read, real_step = [], engine.step

    def step():  # train_step calls it after each micro-batch's backward
        read.append({name: safe_get_full_grad(p).clone() for name, p in trained})
        real_step()

    engine.step = step
    micro_batches = make_rows(model)
    train_step(engine, Batches([batch([micro_batches[i]]) for i in rows]), N, 2)
    partitions = engine.optimizer.grad_partitions_flat_buffer.dtype
    engine.destroy()
    return read, str(partitions)


def _accumulation_worker(rank, port, tiny_models, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    for rows in ((FEW, MANY), (MANY, FEW)):
        results[rows] = gradients_after_each_micro_batch(tiny_models, rows)


@pytest.fixture(scope="module")
def bf16_accumulation(tiny_models):
    """{(first row, second row): gradients_after_each_micro_batch}: a fresh engine for each order."""
    results = mp.Manager().dict()
    mp.spawn(_accumulation_worker, args=(free_port(), tiny_models, results), nprocs=1)
    return dict(results)


def test_bf16_micro_batch_gradients_accumulate_in_fp32(bf16_accumulation):
    """With train.grad_accum=2 in bf16 the engine's gradient partitions are fp32, and the gradient
    the optimizer steps with is the fp32 sum of the two micro-batches' gradients, each read as the
    first micro-batch of a step (the rows in one order, then in the other, on a fresh engine: the
    same weights and the same share of the step's tokens). The tolerance, 1e-6 relative, is far
    inside bf16's rounding (up to 2^-9 relative): the sum rounded to bf16, which accumulating in
    bf16 gives, is outside it."""
    (few_first, partitions), (many_first, _) = bf16_accumulation[FEW, MANY], bf16_accumulation[MANY, FEW]
    assert partitions == "torch.float32"
    few, accumulated = few_first
    many = many_first[0]
    assert few.keys() == many.keys() == accumulated.keys() and any(g.abs().sum() > 0 for g in many.values())
    for name, gradient in few.items():
        assert gradient.dtype == accumulated[name].dtype == torch.float32
        # each micro-batch's gradient is computed in bf16: its values are bf16 numbers
        assert torch.equal(gradient, gradient.bfloat16().float())
        assert torch.equal(many[name], many[name].bfloat16().float())
        torch.testing.assert_close(accumulated[name], gradient + many[name], rtol=1e-6, atol=0,
                                   msg=lambda message: f"{name}: {message}")
    fp32_sums = [few[name] + many[name] for name in few]
    assert any(not torch.allclose(s.bfloat16().float(), s, rtol=1e-6, atol=0) for s in fp32_sums)
