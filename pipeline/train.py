"""Train one stage: python -m pipeline.train CONFIG.yaml [section.key=value ...]

Launch one process per GPU with torchrun, deepspeed or srun; rank and world size come from
their environment. A run whose output_dir holds a checkpoint resumes from it, also with a
different number of ranks (through a universal checkpoint) or loader workers: the data's
current epoch continues, split over the new ranks and workers.
"""

import argparse
import logging
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import yaml

from pipeline import checkpoint
from pipeline.config import Config, describe_options, load_config, to_dict
from pipeline.convert import convert_checkpoint
from pipeline.data import TrainBatches
from pipeline.data.mixture import load_mixture
from pipeline.distributed import broadcast_from_rank0, distributed_env, init_process_group, sum_over_ranks
from pipeline.engine import build_engine, use_bf16
from pipeline.metrics import MetricsLog, Work, step_flops
from pipeline.model import (
    TokenFlexVLM,
    check_attn_implementation,
    supervised_targets,
    supervised_weights,
    write_model_folder,
)
from pipeline.projector import pooled_side
from pipeline.sampler import TokenCountSampler, check_same_across_ranks
from pipeline.tiles import largest_image_slots
from stages import STAGES

log = logging.getLogger("tokenflex")
MIN_TEXT_TOKENS = 64  # room for a prompt and an answer beside an image, when text_tokens_per_image is auto


def train_step(engine: deepspeed.DeepSpeedEngine, data: TrainBatches, num_vision_tokens: int, grad_accum: int,
               loss_reduction: str = "token") -> tuple[float | None, list[dict]]:
    """One optimizer step: every micro-batch of it uses the same N, on every rank.

    The step's loss is the weighted sum of its token losses over every rank and micro-batch
    divided by their total weight (pipeline.model.supervised_weights: under loss_reduction
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


def step_metrics(cfg: Config, engine: deepspeed.DeepSpeedEngine, step: int, n: int, loss: float | None,
                 stats: list[dict], seconds: float) -> dict:
    """The step's metrics over all ranks (one all-reduce); the *_total counters run since the start.

    useful_flops and executed_flops: pipeline.metrics.step_flops, summed over ranks; on GPU,
    mfu and hfu divide them by the step time and the ranks' peak (train.peak_tflops).
    Per mixture source: samples_total/<name> (consumed since the start) and loss_by_source/<name>
    (the step's token loss over that source's supervised tokens, when it had any)."""
    world = dist.get_world_size()
    skipped = loss is None  # on every rank alike (see train_step)
    text_only = any(s["num_images"] == 0 for s in stats)
    per_step = [sum(s[k] for s in stats) for k in ("real_tokens", "pad_tokens", "num_samples", "tile_budget", "num_tiles")]
    running = [stats[-1][k] for k in ("total_truncated", "total_skipped_corrupt")]
    flops = step_flops(engine.module, n, sum((s["work"] for s in stats), Work()))
    names = list(stats[-1]["total_samples_by_source"])
    consumed = list(stats[-1]["total_samples_by_source"].values())
    source_losses = [sum(values) for values in zip(*(s["source_losses"] for s in stats))]
    totals = sum_over_ranks([0.0 if skipped else loss, *per_step, float(text_only), *running, *flops, *consumed,
                             *source_losses])
    loss, real, pad, samples, tiles, real_tiles, text_only_ranks, truncated, corrupt, useful, executed = totals[:11]
    consumed, loss_sums, token_counts = (totals[11 + i * len(names):11 + (i + 1) * len(names)] for i in range(3))
    metrics = {
        "step": step, "num_vision_tokens": n, "update_skipped": skipped, "loss": None if skipped else loss,
        "lr": engine.get_lr()[0], "grad_norm": None if skipped else float(engine.get_global_grad_norm() or 0.0),
        "step_time_s": seconds,
        "tokens_per_s": real / seconds, "samples_per_s": samples / seconds, "padding_fraction": pad / (real + pad),
        "text_only_ranks": int(text_only_ranks), "truncated_total": int(truncated),
        "skipped_corrupt_total": int(corrupt), "useful_flops": useful, "executed_flops": executed,
        "dummy_image_fraction": 1 - real_tiles / tiles,
        "epoch": stats[-1]["epoch"],  # rank 0's data stream (see TrainBatches)
        **{f"samples_total/{name}": int(c) for name, c in zip(names, consumed)},
        **{f"loss_by_source/{name}": s / c for name, s, c in zip(names, loss_sums, token_counts) if c},
    }
    if torch.cuda.is_available():
        peak = seconds * world * cfg.train.peak_tflops * 1e12
        metrics["mfu"], metrics["hfu"] = useful / peak, executed / peak
    return metrics


def enable_gradient_checkpointing(model: TokenFlexVLM) -> None:
    """Recompute activations in backward wherever gradients flow: always the LM (the projector's
    gradient passes through it even when frozen), the tower only when it trains. Reentrant
    checkpointing, because the non-reentrant kind trips over ZeRO-3's parameter gathering."""
    tower_trains = any(p.requires_grad for p in model.vision_tower.parameters())
    parts = [model.language_model] + [model.vision_tower] * tower_trains
    for part in parts:
        part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    log.info("gradient checkpointing on: %s", ", ".join(type(part).__name__ for part in parts))


def train_loop(cfg: Config, rank: int, world_size: int, load_universal: bool) -> int:
    """This rank's part of the training loop: 0 when max_steps is reached, PREEMPTED_EXIT_CODE when
    a stop signal ended it after a checkpoint. An exception leaves with its traceback."""
    for seeded in (random.seed, np.random.seed, torch.manual_seed):
        seeded(cfg.train.seed)
    output_dir, ckpt_dir = Path(cfg.train.output_dir), checkpoint.checkpoint_dir(cfg.train.output_dir)

    stage = STAGES[cfg.train.stage]
    model = stage.build_model(cfg)
    stage.freeze_backbones(model, cfg)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if rank == 0:
        write_model_folder(ckpt_dir / "model", model.config, model.tokenizer, model.image_processor)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    engine = build_engine(model, stage.param_groups(model, cfg), cfg, load_universal=load_universal)

    resumed = checkpoint.load(engine, ckpt_dir)
    trainer_state, data_states = resumed or ({"step": 0, "wandb_id": None}, None)
    start = trainer_state["step"]
    sampler = TokenCountSampler(cfg.tokens.counts, cfg.tokens.seed)
    metrics = MetricsLog(cfg, to_dict(cfg), start, trainer_state["wandb_id"]) if rank == 0 else None
    wandb_id = broadcast_from_rank0(metrics.wandb_id if metrics else None)
    data = TrainBatches(cfg.data, model.tokenizer, model.image_processor, rank, world_size, states=data_states)

    def save(step: int) -> str:
        state = {"wandb_id": wandb_id, "sampler": sampler.state_dict(), "stage": cfg.train.stage}
        return checkpoint.save(engine, ckpt_dir, step, state, data.state_dict(), cfg.train.keep_last,
                               data.mixture.manifest(cfg.data.seed))

    checkpoint.StopRequest.install()
    engine.train()
    saved_step, code = start, 0
    for step in range(start, cfg.train.max_steps):
        n = sampler(step)
        if check_same_across_ranks(n, checkpoint.StopRequest.requested):
            if saved_step != step:
                save(step)
            log.info("stopped at step %d for preemption; exit code %d", step, checkpoint.PREEMPTED_EXIT_CODE)
            code = checkpoint.PREEMPTED_EXIT_CODE
            break
        started = time.perf_counter()
        loss, stats = train_step(engine, data, n, cfg.train.grad_accum, cfg.train.loss_reduction)
        record = step_metrics(cfg, engine, step + 1, n, loss, stats, time.perf_counter() - started)
        if metrics:
            metrics.log(record)
        if (step + 1) % cfg.train.save_every == 0 or step + 1 == cfg.train.max_steps:
            save(step + 1)
            saved_step = step + 1
    if metrics:
        metrics.close()
    return code


def run(cfg: Config) -> int:
    """Train on this rank, then, on rank 0, export <output_dir>/final. Returns the exit code."""
    rank, world_size, _ = distributed_env()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s")
    ckpt_dir = checkpoint.checkpoint_dir(cfg.train.output_dir)
    # Long single-rank work happens while no process group exists, so no rank waits on it in a
    # collective (which would time out): a universal conversion before, the export after.
    load_universal = checkpoint.prepare_universal(ckpt_dir, rank, world_size)
    init_process_group(cfg.train.collective_timeout_minutes)
    code = train_loop(cfg, rank, world_size, load_universal)
    # Every rank is done, rank 0's wandb included, before any exits: with srun --kill-on-bad-exit, the
    # first rank to exit with code 3 (preempted) has Slurm send SIGTERM to the others.
    dist.barrier()
    dist.destroy_process_group()
    if code == checkpoint.PREEMPTED_EXIT_CODE:
        # Saved and leaving: such a SIGTERM must not kill this process (srun would report the
        # signal instead of 3, and the job would not be requeued), not even once the interpreter
        # has reset its own signal handlers on the way out.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if code == 0 and cfg.train.export_final and rank == 0:
        convert_checkpoint(ckpt_dir, Path(cfg.train.output_dir) / "final")
        log.info("model folder written to %s", Path(cfg.train.output_dir) / "final")
    return code


def check_inputs(cfg: Config) -> None:
    """Fail in seconds, naming the key, instead of after DeepSpeed and model start-up, or hours
    later when a bad token count is first drawn."""
    stage = STAGES[cfg.train.stage]
    paths = {**stage.required_paths(cfg), "train.deepspeed": cfg.train.deepspeed}
    for key, path in paths.items():
        if not path or not Path(path).exists():
            raise FileNotFoundError(f"{key}={path!r} not found (relative paths start at {Path.cwd()})")
    load_mixture(cfg.data.shards)
    if cfg.model.attn_implementation == "flash_attention_2" and not use_bf16(cfg.train.precision):
        raise ValueError(f"model.attn_implementation=flash_attention_2 needs bf16 weights (flash-attn has no fp32 "
                         f"kernels), but train.precision={cfg.train.precision} trains in fp32 here (auto: bf16 on a "
                         f"GPU, fp32 without one); set train.precision=bf16, or model.attn_implementation=sdpa")
    try:
        check_attn_implementation(cfg.model.attn_implementation)
    except ValueError as error:
        raise ValueError(f"model.attn_implementation: {error}") from None
    vision = stage.vision_config(cfg)
    grid = vision["image_size"] // vision["patch_size"]
    for count in cfg.tokens.counts:
        try:
            pooled_side(count, grid)
        except ValueError as error:
            raise ValueError(f"tokens.counts: {error}") from None
    # Room for a sample with the largest image data.max_tiles allows at the largest N: its slots
    # (pipeline/tiles.py) plus the text that data.text_tokens_per_image assumes per tile, or with
    # auto (measured later, on the data) a short prompt and answer. The packer can't cut a sample
    # inside its image.
    largest, text, max_tiles = max(cfg.tokens.counts), cfg.data.text_tokens_per_image, cfg.data.max_tiles
    text, named = (MIN_TEXT_TOKENS, "a minimum of text") if text == "auto" else (text, "data.text_tokens_per_image")
    image = largest_image_slots(max_tiles, largest)
    if cfg.data.seq_len < image + text:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} can't hold the largest image with its text at N={largest}: "
                         f"it must be at least the slots of an image of data.max_tiles={max_tiles} tiles at "
                         f"max(tokens.counts) + {named} = {image} + {text} = {image + text}")
    ckpt_dir = checkpoint.checkpoint_dir(cfg.train.output_dir)
    tag, trainer_state = checkpoint.latest_trainer_state(ckpt_dir)
    if tag and not cfg.tokens.allow_change_on_resume:
        TokenCountSampler(cfg.tokens.counts, cfg.tokens.seed).check_resumes(trainer_state["sampler"], ckpt_dir / tag)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="options (override any with section.key=value):\n" + "\n".join(describe_options()),
    )
    parser.add_argument("config", help="YAML config, e.g. configs/stage1_align.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=100")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
