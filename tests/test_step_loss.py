"""The step's loss is one per-token mean over every rank and micro-batch (transformers PR #34191).

The same two rows, one with few supervised tokens and one with many, trained four ways on real
DeepSpeed ZeRO-3 engines (gloo, spawned processes) must give the same loss and gradients:
2 ranks x 1 micro-batch, 1 rank x 2 micro-batches, 2 ranks x 2 micro-batches (each row twice),
1 rank x 1 batch of both rows. A mean per micro-batch, which DeepSpeed then averages over
micro-batches and ranks, weighs the few tokens' row as much as the many tokens' row and fails
this. A rank whose micro-batch has no answer token adds nothing: the other rank's row trains as
if alone (an average over ranks halves it). A step in which no rank has an answer token is
skipped on every rank: no optimizer update, no LR-schedule move, and the next step is the same
as a first one.

The same for train.loss_reduction=square (InternVL's, the TokenFLEX authors'): each token weighs
1/sqrt(its sample's answer tokens), and the step's loss is one weighted mean over every rank and
micro-batch, whichever way the rows are split.
"""

import os

import deepspeed
import pytest
import torch
import torch.multiprocessing as mp
from deepspeed.utils import safe_get_full_grad
from torch.nn import functional as F

from pipeline.engine.engine import build_engine
from pipeline.model.chat import IGNORE_INDEX
from pipeline.model.loss import supervised_targets
from pipeline.model.vlm import TokenFlexVLM
from pipeline.run.config import load_config
from pipeline.train.distributed import sum_over_ranks
from pipeline.train.step import train_step
from stages import STAGES
from tests.distributed import REPO
from tools.demo import free_port

N = 16
LENGTH = 96
SUPERVISED = (3, 60, 0)  # per row: the answer tokens at its end
FEW, MANY, NONE = range(3)
WAYS = ["2 ranks x 1 micro-batch", "1 rank x 2 micro-batches", "2 ranks x 2 micro-batches",
        "1 rank x 1 batch of both rows"]
SKIPPED_FIRST = "2 ranks, a step without answer tokens, then the rows"

pytestmark = pytest.mark.timeout(600)


def build_model(tiny_models):
    torch.manual_seed(0)  # the projector is random-init: the same on every rank and every run
    return TokenFlexVLM.from_components(tiny_models / "vision", tiny_models / "qwen2")


def make_rows(model):
    """Rows of one sample each: N image slots, random text, the last SUPERVISED[i] tokens
    labelled. Batches of any subset of them are built with `batch(rows)`."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for supervised in SUPERVISED:
        input_ids = torch.randint(10, model.config.image_token_id, (LENGTH,), generator=generator)
        input_ids[2:2 + N] = model.config.image_token_id
        labels = torch.full((LENGTH,), IGNORE_INDEX)
        labels[LENGTH - supervised:] = input_ids[LENGTH - supervised:]
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(LENGTH),
                     "pixel_values": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=generator)})
    return rows


def batch(rows):
    stacked = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    return {**stacked, "source_ids": torch.zeros_like(stacked["input_ids"]),  # one data source
            "image_mask": torch.ones(len(rows), dtype=torch.bool), "stats": {"total_samples_by_source": {"rows": 0}}}


class Batches:
    """This rank's micro-batches, in order: the data side of train_step, with chosen rows."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def next_batch(self, num_vision_tokens):
        return next(self.batches)


def train_steps(tiny_models, steps, grad_accum, reduction):
    """Optimizer steps of stage 2 (projector + LM train) through pipeline.train.step.train_step, on one
    engine; steps: this rank's micro-batches of each step. Returns, per step: the loss (shares
    summed over ranks; None when the step was skipped), the full gradients of every trained
    parameter read when the optimizer stepped ({} when it did not; clipping off), the LR
    schedule's position and the number of parameter partitions AdamW holds moments for."""
    cfg = load_config(REPO / "configs" / "tiny_cpu_stage2.yaml", [
        f"data.rows_per_batch={len(steps[0][0]['input_ids'])}", f"train.grad_accum={grad_accum}",
        "optim.grad_clip=0.0", f"train.loss_reduction={reduction}"])
    model = build_model(tiny_models)
    STAGES["finetune"].freeze_backbones(model, cfg)
    engine = build_engine(model, STAGES["finetune"].param_groups(model, cfg), cfg)
    trained = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]

    def read_grads(optimizer, args, kwargs):
        # ZeRO-3 holds each rank's reduced partition until the optimizer steps; gather them whole
        grads.update({name: safe_get_full_grad(p).clone() for name, p in trained})

    engine.optimizer.optimizer.register_step_pre_hook(read_grads)
    results = []
    for micro_batches in steps:
        grads = {}
        loss_share, _ = train_step(engine, Batches(micro_batches), N, grad_accum, cfg.train.loss_reduction)
        loss = None if loss_share is None else sum_over_ranks([float(loss_share)])[0]
        results.append((loss, grads, engine.lr_scheduler.last_epoch, len(engine.optimizer.optimizer.state)))
    engine.destroy()
    return results


def _worker(rank, world_size, port, tiny_models, runs, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rows = make_rows(build_model(tiny_models))
    for name, (row_sets, grad_accum, *reduction) in runs.items():
        steps = [[batch([rows[i] for i in row_set]) for row_set in step] for step in row_sets[rank]]
        results[name, rank] = train_steps(tiny_models, steps, grad_accum, *(reduction or ["token"]))


def run_on(ranks, runs, tiny_models):
    """runs: name -> (per rank, per step, the row indices of each micro-batch; grad_accum[; loss
    reduction, token when not given]).
    Returns name -> rank 0's results per step, and (name, rank) -> each rank's."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(ranks, free_port(), tiny_models, runs, results), nprocs=ranks)
    return {**dict(results), **{name: results[name, 0] for name in runs}}


@pytest.fixture(scope="module")
def runs(tiny_models):
    return {
        **run_on(2, {"2 ranks x 1 micro-batch": ([[[[FEW]]], [[[MANY]]]], 1),
                     "2 ranks x 2 micro-batches": ([[[[FEW], [MANY]]], [[[MANY], [FEW]]]], 2),
                     "2 ranks, one without answer tokens": ([[[[FEW]]], [[[NONE]]]], 1),
                     SKIPPED_FIRST: ([[[[NONE]], [[FEW]]], [[[NONE]], [[MANY]]]], 1),
                     "square: 2 ranks x 2 micro-batches": ([[[[FEW], [MANY]]], [[[MANY], [FEW]]]], 2, "square")},
                tiny_models),
        **run_on(1, {"1 rank x 2 micro-batches": ([[[[FEW], [MANY]]]], 2),
                     "1 rank x 1 batch of both rows": ([[[[FEW, MANY]]]], 1),
                     "1 rank, the few tokens' row alone": ([[[[FEW]]]], 1),
                     "square: 1 rank x 1 batch of both rows": ([[[[FEW, MANY]]]], 1, "square")}, tiny_models),
    }


def per_token_losses(tiny_models, row_indices):
    """Cross-entropy of each supervised token of the rows, computed without DeepSpeed."""
    model = build_model(tiny_models)
    rows = make_rows(model)
    losses = []
    for i in row_indices:
        with torch.no_grad():
            logits = model(batch([rows[i]]), N, return_logits=True).logits
        targets, supervised = supervised_targets(rows[i]["labels"][None])
        losses.append(F.cross_entropy(logits[:, :-1][supervised], targets[supervised], reduction="none"))
    return losses


def assert_same_gradients(grads, reference, name):
    # every trained parameter gets a gradient, but the tiles' row end: these images are one tile each
    assert reference and all(g.abs().sum() > 0 for p, g in reference.items() if p != "tile_layout.row_end")
    assert grads.keys() == reference.keys()
    for param in reference:
        torch.testing.assert_close(grads[param], reference[param], rtol=1e-4, atol=1e-7, msg=f"{name}: {param}")


def test_step_loss_is_the_per_token_mean_over_ranks_and_micro_batches(runs, tiny_models):
    few, many = per_token_losses(tiny_models, [FEW, MANY])
    per_token = torch.cat([few, many]).mean().item()
    per_row = (few.mean().item() + many.mean().item()) / 2
    assert abs(per_token - per_row) > 1e-3, "the rows' losses are too alike for the test to tell the means apart"
    for name in WAYS:
        assert runs[name][0][0] == pytest.approx(per_token, rel=1e-5), name


def test_gradients_agree_whether_rows_are_split_over_ranks_micro_batches_or_a_batch(runs):
    reference = runs["1 rank x 1 batch of both rows"][0][1]
    for name in WAYS[:-1]:
        assert_same_gradients(runs[name][0][1], reference, name)


def test_a_rank_without_answer_tokens_adds_nothing(runs, tiny_models):
    """Its lm_head still runs on no rows (ZeRO-3 needs every rank's module forwards)."""
    (few,) = per_token_losses(tiny_models, [FEW])
    name = "2 ranks, one without answer tokens"
    assert runs[name][0][0] == pytest.approx(few.mean().item(), rel=1e-5)
    assert_same_gradients(runs[name][0][1], runs["1 rank, the few tokens' row alone"][0][1], name)


def test_a_step_without_answer_tokens_on_any_rank_is_skipped_on_every_rank(runs):
    for rank in (0, 1):
        (loss, grads, schedule, moments), _ = runs[SKIPPED_FIRST, rank]
        assert (loss, grads, schedule, moments) == (None, {}, 0, 0), f"rank {rank}: the optimizer or LR schedule moved"
    # the next step is a first step: same loss, gradients and LR-schedule position as without the skipped one
    loss, grads, schedule, moments = runs[SKIPPED_FIRST][1]
    first = runs["2 ranks x 1 micro-batch"][0]
    assert loss == pytest.approx(first[0], rel=1e-6)
    assert_same_gradients(grads, first[1], SKIPPED_FIRST)
    assert (schedule, moments) == (first[2], first[3]) and moments > 0


def test_square_reduction_weighs_each_sample_by_the_root_of_its_tokens_over_ranks_and_micro_batches(runs, tiny_models):
    """Each row's mean token loss weighs sqrt(its answer tokens): 2 ranks x 2 micro-batches gives
    the loss and gradients of the two rows in one batch on one rank, and neither the per-token
    mean nor the per-row mean."""
    few, many = per_token_losses(tiny_models, [FEW, MANY])
    roots = torch.tensor([len(few), len(many)], dtype=torch.float64).sqrt()
    square = float((roots * torch.stack([few.mean(), many.mean()]).double()).sum() / roots.sum())
    per_token = torch.cat([few, many]).mean().item()
    assert abs(square - per_token) > 1e-3, "the rows' losses are too alike for the test to tell the means apart"
    split, whole = runs["square: 2 ranks x 2 micro-batches"][0], runs["square: 1 rank x 1 batch of both rows"][0]
    assert split[0] == pytest.approx(square, rel=1e-5) and whole[0] == pytest.approx(square, rel=1e-5)
    assert_same_gradients(split[1], whole[1], "square: 2 ranks x 2 micro-batches")
    token_grads = runs["1 rank x 1 batch of both rows"][0][1]
    assert any(not torch.allclose(whole[1][p], token_grads[p], rtol=1e-3) for p in token_grads)


def test_square_weights_tell_packed_samples_apart():
    """Two samples packed in one row (position ids restart) and one in a second row: each token
    weighs 1/sqrt of its own sample's supervised tokens, whatever the row."""
    from pipeline.model.loss import supervised_weights

    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 2:4] = 5  # sample A: 2 answer tokens (positions 0-3)
    labels[0, 5:8] = 5  # sample B: 3 answer tokens (positions 4-7)
    labels[1, 4:8] = 5  # sample C: 4 answer tokens, alone in its row
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], list(range(8))])
    weights = supervised_weights(labels, position_ids, "square")
    expected = [2 ** -0.5] * 2 + [3 ** -0.5] * 3 + [4 ** -0.5] * 4
    torch.testing.assert_close(weights, torch.tensor(expected))
    torch.testing.assert_close(supervised_weights(labels, position_ids, "token"), torch.ones(9))
