"""The training run on one rank: the model and engine its stage builds, the loop over steps with its
checkpoints and preemption stop, then the model folder it exports.
"""

import logging
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from pipeline.data import TrainBatches
from pipeline.engine.engine import build_engine
from pipeline.export.convert import convert_checkpoint
from pipeline.model.folder import write_model_folder
from pipeline.run.config import Config, to_dict
from pipeline.run.layout import checkpoint_dir
from pipeline.train import checkpoint
from pipeline.train.distributed import broadcast_from_rank0, distributed_env, init_process_group
from pipeline.train.metrics import MetricsLog, step_metrics
from pipeline.train.sampler import TokenCountSampler, check_same_across_ranks
from pipeline.train.step import train_step
from stages import STAGES
from stages.common import enable_gradient_checkpointing

log = logging.getLogger("tokenflex")


def train_loop(cfg: Config, rank: int, world_size: int, load_universal: bool) -> int:
    """This rank's part of the training loop: 0 when max_steps is reached, PREEMPTED_EXIT_CODE when
    a stop signal ended it after a checkpoint. An exception leaves with its traceback."""
    for seeded in (random.seed, np.random.seed, torch.manual_seed):
        seeded(cfg.train.seed)
    output_dir, ckpt_dir = Path(cfg.train.output_dir), checkpoint_dir(cfg.train.output_dir)

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
    ckpt_dir = checkpoint_dir(cfg.train.output_dir)
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
