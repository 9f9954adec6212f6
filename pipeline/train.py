"""Train one stage: python -m pipeline.train CONFIG.yaml [section.key=value ...]

Launch one process per GPU with torchrun, deepspeed or srun; rank and world size come from
their environment. A run whose output_dir holds a checkpoint resumes from it, also with a
different number of ranks (through a universal checkpoint; the data stream then restarts).
"""

import argparse
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from pipeline import checkpoint
from pipeline.config import describe_options, load_config, to_dict
from pipeline.convert import convert_checkpoint
from pipeline.data import TrainBatches, resolve_shards
from pipeline.engine import build_engine, flops_per_step, init_distributed
from pipeline.metrics import MetricsLog
from pipeline.model import write_model_folder
from pipeline.sampler import TokenCountSampler, check_same_across_ranks
from stages import STAGES

log = logging.getLogger("tokenflex")


def train_step(engine, data, num_vision_tokens, grad_accum):
    """One optimizer step: every micro-batch of it uses the same N, on every rank."""
    losses, stats = [], []
    for _ in range(grad_accum):
        batch = data.next_batch(num_vision_tokens)
        stats.append(batch.pop("stats"))
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(batch, num_vision_tokens).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float().cpu())
    return torch.stack(losses).mean(), stats


def summed_over_ranks(*values):
    totals = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(totals)
    return totals.tolist()


def step_metrics(cfg, engine, step, n, loss, stats, seconds):
    """The step's metrics over all ranks (one all-reduce); the *_total counters run since the start."""
    world = dist.get_world_size()
    text_only = any(s["num_images"] == 0 for s in stats)
    per_step = [sum(s[k] for s in stats) for k in ("real_tokens", "pad_tokens", "num_samples", "max_images", "num_images")]
    running = [stats[-1][k] for k in ("total_truncated", "total_skipped_corrupt")]
    loss_sum, real, pad, samples, images, real_images, text_only_ranks, truncated, corrupt = summed_over_ranks(
        float(loss), *per_step, float(text_only), *running)
    metrics = {
        "step": step, "num_vision_tokens": n, "loss": loss_sum / world, "lr": engine.get_lr()[0],
        "grad_norm": float(engine.get_global_grad_norm() or 0.0), "step_time_s": seconds,
        "tokens_per_s": real / seconds, "samples_per_s": samples / seconds, "padding_fraction": pad / (real + pad),
        "text_only_ranks": int(text_only_ranks), "truncated_total": int(truncated),
        "skipped_corrupt_total": int(corrupt), "dummy_image_fraction": 1 - real_images / images,
        "epoch": stats[-1]["epoch"],  # rank 0's data stream (see TrainBatches)
    }
    if torch.cuda.is_available():
        flops = flops_per_step(engine.module, real + pad, images)
        metrics["mfu"] = flops / (seconds * world * cfg.train.peak_tflops * 1e12)
    return metrics


def enable_gradient_checkpointing(model):
    """Recompute activations in backward wherever gradients flow: always the LM (the projector's
    gradient passes through it even when frozen), the tower only when it trains. Reentrant
    checkpointing, because the non-reentrant kind trips over ZeRO-3's parameter gathering."""
    tower_trains = any(p.requires_grad for p in model.vision_tower.parameters())
    parts = [model.language_model] + [model.vision_tower] * tower_trains
    for part in parts:
        part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    log.info("gradient checkpointing on: %s", ", ".join(type(part).__name__ for part in parts))


def run(cfg):
    rank, world_size = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s")
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
    universal = checkpoint.prepare_universal(ckpt_dir)  # True: latest was written by another world size
    engine = build_engine(model, stage.param_groups(model, cfg), cfg, load_universal=universal)

    resumed = checkpoint.load(engine, ckpt_dir)
    trainer_state, data_state = resumed or ({"step": 0, "wandb_id": None}, None)
    start = trainer_state["step"]
    data = TrainBatches(cfg.data, model.tokenizer, model.image_processor, rank, world_size, state=data_state)
    sampler = TokenCountSampler(cfg.tokens.counts, cfg.tokens.seed)
    metrics = MetricsLog(cfg, to_dict(cfg), start, trainer_state["wandb_id"]) if rank == 0 else None
    wandb_id = [metrics.wandb_id if metrics else None]
    dist.broadcast_object_list(wandb_id)

    def save(step):
        state = {"wandb_id": wandb_id[0], "sampler": sampler.state_dict(), "stage": cfg.train.stage}
        return checkpoint.save(engine, ckpt_dir, step, state, data.state_dict(), cfg.train.keep_last)

    checkpoint.StopRequest.install()
    engine.train()
    saved_step = start
    for step in range(start, cfg.train.max_steps):
        n = sampler(step)
        if check_same_across_ranks(n, checkpoint.StopRequest.requested):
            if saved_step != step:
                save(step)
            log.info("stopped at step %d for preemption; exit code %d", step, checkpoint.PREEMPTED_EXIT_CODE)
            if metrics:
                metrics.close()
            return checkpoint.PREEMPTED_EXIT_CODE
        started = time.perf_counter()
        loss, stats = train_step(engine, data, n, cfg.train.grad_accum)
        record = step_metrics(cfg, engine, step + 1, n, loss, stats, time.perf_counter() - started)
        if metrics:
            metrics.log(record)
        if (step + 1) % cfg.train.save_every == 0 or step + 1 == cfg.train.max_steps:
            save(step + 1)
            saved_step = step + 1
    if metrics:
        metrics.close()
    if cfg.train.export_final and rank == 0:
        convert_checkpoint(ckpt_dir, output_dir / "final")
        log.info("model folder written to %s", output_dir / "final")
    dist.barrier()
    return 0


def check_inputs(cfg):
    """Fail in seconds, naming the key, instead of after DeepSpeed and model start-up."""
    paths = {**STAGES[cfg.train.stage].required_paths(cfg), "train.deepspeed": cfg.train.deepspeed}
    for key, path in paths.items():
        if not path or not Path(path).exists():
            raise FileNotFoundError(f"{key}={path!r} not found (relative paths start at {Path.cwd()})")
    resolve_shards(cfg.data.shards)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="options (override any with section.key=value):\n" + "\n".join(describe_options()),
    )
    parser.add_argument("config", help="YAML config, e.g. configs/stage1_align.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=100")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
