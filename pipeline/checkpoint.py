"""Checkpoints: save, resume, and stop-on-signal.

Layout under <output_dir>/checkpoints:
    model/              the model's structure (config, tokenizer, image processor), no weights
    step-000100/        DeepSpeed's files, plus trainer_state.json and rank-<r>.pt (data + RNG)
    latest              the tag of the newest complete checkpoint, replaced atomically
"""

import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("tokenflex")

PREEMPTED_EXIT_CODE = 3  # the sbatch scripts requeue the job on this code
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Set by SIGUSR1/SIGTERM (Slurm's warning before the time limit or preemption), or by
    request_stop(); the training loop checks it once per step, saves and exits."""

    requested = False

    @classmethod
    def install(cls):
        for sig in STOP_SIGNALS:
            signal.signal(sig, cls.handle)

    @classmethod
    def handle(cls, signum, frame):
        log.warning("received %s: will save a checkpoint and stop after this step", signal.Signals(signum).name)
        cls.requested = True


def request_stop():
    StopRequest.requested = True


def checkpoint_dir(output_dir):
    return Path(output_dir) / "checkpoints"


def latest_tag(ckpt_dir):
    pointer = Path(ckpt_dir) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir, step, trainer_state, data_state, keep_last):
    """Collective: every rank writes its shard, then rank 0 moves `latest` and prunes old ones.

    A crash mid-save leaves `latest` on the previous complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step-{step:06d}"
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save({"data": data_state, "rng": rng_state()}, ckpt_dir / tag / f"rank-{rank}.pt")
    dist.barrier()
    if rank == 0:
        state = dict(trainer_state, step=step, world_size=dist.get_world_size())
        (ckpt_dir / tag / "trainer_state.json").write_text(json.dumps(state, indent=2))
        temporary = ckpt_dir / "latest.tmp"
        temporary.write_text(tag)
        os.replace(temporary, ckpt_dir / "latest")
        for old in sorted(ckpt_dir.glob("step-*"))[:-keep_last]:
            shutil.rmtree(old)
        log.info("saved checkpoint %s", ckpt_dir / tag)
    dist.barrier()
    return tag


def load(engine, ckpt_dir):
    """Resume from `latest` if there is one: returns (trainer_state, data_state) or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    state_file = Path(ckpt_dir) / tag / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} missing: checkpoint {tag} is incomplete; point `latest` at an older one")
    trainer_state = json.loads(state_file.read_text())
    world_size = dist.get_world_size()
    if trainer_state["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {Path(ckpt_dir) / tag} was written by {trainer_state['world_size']} ranks but this run has "
            f"{world_size}. ZeRO-3 optimizer shards are per rank, so resume with {trainer_state['world_size']} ranks, "
            f"or convert the weights (python -m tools.convert_checkpoint {ckpt_dir} OUT) and start a new run from "
            f"OUT with model.init_from=OUT in a new train.output_dir"
        )
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    rank_state = torch.load(Path(ckpt_dir) / tag / f"rank-{dist.get_rank()}.pt", weights_only=False)
    set_rng_state(rank_state["rng"])
    log.info("resumed from checkpoint %s at step %d", Path(ckpt_dir) / tag, trainer_state["step"])
    return trainer_state, rank_state["data"]
