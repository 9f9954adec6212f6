"""One optimizer step: its micro-batches through the engine, at one N on every rank."""

import deepspeed
import torch

from pipeline.data import TrainBatches
from pipeline.model.loss import supervised_targets, supervised_weights
from pipeline.train.distributed import sum_over_ranks
from pipeline.train.flops import Work


def train_step(engine: deepspeed.DeepSpeedEngine, data: TrainBatches, num_vision_tokens: int, grad_accum: int,
               loss_reduction: str = "token") -> tuple[float | None, list[dict]]:
    """One optimizer step: every micro-batch of it uses the same N, on every rank.

    The step's loss is the weighted sum of its token losses over every rank and micro-batch
    divided by their total weight (pipeline.model.loss.supervised_weights: under loss_reduction
    "token" each token weighs 1, so packed micro-batches with few or many answer tokens weigh
    each token the same; under "square" each sample's tokens weigh 1/sqrt of their number).
    Returns this rank's share of that loss (the shares add up over ranks), or None when the
    step was skipped, and each micro-batch's stats, with the Work it asked of the model and its
    losses by source.

    The batches stay on the host: the model copies what the device computes with and reads the
    rest where it lies (TokenFlexVLM.forward), so the only wait for the device is the one read
    of the step's losses at its end.

    A step in which no rank has a supervised token is skipped on every rank alike (they all
    read the same global count): no forward, backward or optimizer step, so AdamW's moments and
    the LR schedule don't move on a zero gradient, and every rank runs the same collectives
    (none) for it.
    """
    batches = [data.next_batch(num_vision_tokens) for _ in range(grad_accum)]
    pad_token_id = engine.module.tokenizer.pad_token_id
    stats = [{**batch.pop("stats"), "work": Work.of(batch, pad_token_id)} for batch in batches]
    num_sources = len(stats[0]["total_samples_by_source"])
    supervised = int(sum_over_ranks([sum(s["work"].supervised for s in stats)])[0])
    if supervised == 0:
        # the model did no work, and no source has a loss
        return None, [{**s, "work": Work(), "source_losses": [0.0] * 2 * num_sources} for s in stats]
    total_weight = supervised if loss_reduction == "token" else sum_over_ranks([sum(
        float(supervised_weights(b["labels"], b.get("position_ids"), loss_reduction).sum()) for b in batches)])[0]
    losses = []  # per micro-batch, on the device: its loss, then its summed token losses per source
    for batch in batches:
        out = engine(batch, num_vision_tokens, num_items_in_batch=total_weight, loss_reduction=loss_reduction)
        # DeepSpeed averages gradients over data-parallel ranks (ZeRO's reduce divides by their
        # number): scaling by it leaves the sum over ranks. No division by grad_accum either:
        # the global token count already spans the micro-batches.
        engine.backward(out.loss * engine.dp_world_size, scale_wrt_gas=False)
        engine.step()
        sources = token_sources(batch["labels"], batch["source_ids"]).to(out.token_losses.device, non_blocking=True)
        by_source = out.token_losses.new_zeros(num_sources, dtype=torch.float64).index_add_(
            0, sources, out.token_losses.double())
        losses.append(torch.cat([out.loss.detach().double().view(1), by_source]))
    values = torch.stack(losses).tolist()  # the step's one wait for the device
    for batch, batch_stats, (_, *source_sums) in zip(batches, stats, values):
        counts = torch.bincount(token_sources(batch["labels"], batch["source_ids"]), minlength=num_sources)
        batch_stats["source_losses"] = source_sums + counts.tolist()
    return sum(loss for loss, *_ in values), stats


def token_sources(labels: torch.Tensor, source_ids: torch.Tensor) -> torch.Tensor:
    """The mixture source of each supervised token of a micro-batch (the sample it belongs to), in
    supervised_targets order, on the host."""
    _, supervised = supervised_targets(labels)
    return source_ids[:, 1:][supervised]
