"""Checkpoints: save, resume (at the same or another number of ranks), and stop on a signal.
Where they lie in the run's folder: pipeline/run/layout.py.
"""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from pipeline.run.layout import (
    checkpoint_tags,
    conversion_failure_file,
    latest_trainer_state,
    universal_dir,
)

log = logging.getLogger("tokenflex")

PREEMPTED_EXIT_CODE = 3  # the sbatch scripts requeue the job on this code
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Set by SIGUSR1/SIGTERM (Slurm's warning before the time limit or preemption), or by
    request_stop(); the training loop checks it once per step, saves and exits."""

    requested = False

    @classmethod
    def install(cls) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, cls.handle)

    @classmethod
    def handle(cls, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: will save a checkpoint and stop after this step", signal.Signals(signum).name)
        cls.requested = True


def request_stop() -> None:
    StopRequest.requested = True


def prepare_universal(ckpt_dir: str | Path, rank: int, world_size: int) -> bool:
    """Run before the process group exists. True when `latest` was written by a different number
    of ranks than this run has: rank 0 has then converted it once (reused if already there) to
    <tag>-universal with DeepSpeed's ds_to_universal, and the engine must be built with load_universal.

    The other ranks wait for that folder on the file system, not in a collective: converting a 7B
    model's optimizer state takes longer than any collective timeout. A failed conversion leaves
    <tag>-universal.failed with the error, which stops every rank, also on later starts, until
    deleted (a rank can't tell an old file from a new one). A rank 0 that dies without writing it
    ends the job through its launcher (torchrun, or srun --kill-on-bad-exit)."""
    tag, trainer_state = latest_trainer_state(ckpt_dir)
    if tag is None or trainer_state["world_size"] == world_size:
        return False
    source = Path(ckpt_dir) / tag
    target, failure = universal_dir(source), conversion_failure_file(source)
    if rank == 0 and not target.is_dir() and not failure.is_file():
        convert_to_universal(source, trainer_state["world_size"], world_size)
    if rank != 0 and not target.is_dir():
        log.warning("rank %d: waiting for rank 0 to convert %s to %s", rank, source, target.name)
    while not target.is_dir():
        if failure.is_file():
            raise RuntimeError(f"{failure.read_text()}\n(delete {failure} to try the conversion again)")
        time.sleep(2)
    return True


def convert_to_universal(source: Path, saved_world_size: int, world_size: int) -> None:
    """Write <source>-universal via a temporary folder, renamed when complete (a crash leaves no
    half folder behind); on failure, write the error, naming the checkpoint and what to do, to
    conversion_failure_file(source) instead."""
    temporary, target = Path(f"{source}-universal.tmp"), universal_dir(source)
    shutil.rmtree(temporary, ignore_errors=True)
    log.info("checkpoint %s was written by %d ranks; converting it to a universal checkpoint for %d ranks",
             source, saved_world_size, world_size)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(source), "--output_folder", str(temporary)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    (source.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; we name the tag
    if result.returncode != 0:
        shutil.rmtree(temporary, ignore_errors=True)
        conversion_failure_file(source).write_text(
            f"checkpoint {source} was written by {saved_world_size} ranks and this run has {world_size}; "
            f"converting it to a universal checkpoint failed: {(result.stderr or result.stdout)[-2000:]}\n"
            f"Resume with {saved_world_size} ranks, or convert the weights (python -m tools.convert_checkpoint "
            f"{source.parent} OUT) and start a new run from OUT with model.init_from=OUT in a new train.output_dir")
        return
    os.replace(temporary, target)


def rng_state() -> dict:
    """This process's RNG states. On a GPU, only its own device's: a process may see one GPU or
    all of its node's (srun --gpus-per-task=1, or torchrun), and a resume must not depend on which."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # written before 2026-12: every GPU the process saw; it trained on its current one
        own = torch.cuda.current_device()
        cuda = cuda[own] if own < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def save(engine: deepspeed.DeepSpeedEngine, ckpt_dir: str | Path, step: int, trainer_state: dict, data_state: dict,
         keep_last: int, mixture: dict | None = None) -> str:
    """Collective: every rank writes its shard, then rank 0 moves `latest` and prunes old ones.
    mixture: the data's manifest (Mixture.manifest()), written by rank 0 as mixture.json.

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
        if mixture is not None:
            (ckpt_dir / tag / "mixture.json").write_text(json.dumps(mixture, indent=1))
        temporary = ckpt_dir / "latest.tmp"
        temporary.write_text(tag)
        os.replace(temporary, ckpt_dir / "latest")
        for old in checkpoint_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old)
            shutil.rmtree(universal_dir(ckpt_dir / old), ignore_errors=True)
            conversion_failure_file(ckpt_dir / old).unlink(missing_ok=True)
        log.info("saved checkpoint %s", ckpt_dir / tag)
    dist.barrier()
    return tag


def load(engine: deepspeed.DeepSpeedEngine, ckpt_dir: str | Path) -> tuple[dict, list[dict]] | None:
    """Resume from `latest` if there is one: returns (trainer_state, data_states) or None, where
    data_states holds every saved rank's data state, in rank order (pipeline.data.batches.TrainBatches
    replays its own at the same layout and splits the job's remaining data at another).

    A checkpoint from a different number of ranks loads from its universal form (see
    prepare_universal): weights, optimizer, LR schedule, step and the data's epoch continue; the
    RNG states can't be mapped to the new ranks."""
    tag, trainer_state = latest_trainer_state(ckpt_dir)
    if tag is None:
        return None
    source, saved_world_size, world_size = Path(ckpt_dir) / tag, trainer_state["world_size"], dist.get_world_size()
    if saved_world_size != world_size and not engine.load_universal_checkpoint():
        raise RuntimeError(
            f"checkpoint {source} was written by {saved_world_size} ranks but this run has {world_size} "
            f"and the engine was not built to load its universal form (checkpoint.prepare_universal)")
    load_tag = tag if saved_world_size == world_size else universal_dir(source).name
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=load_tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / load_tag}")
    log.info("resumed from checkpoint %s at step %d", source, trainer_state["step"])
    saved = [torch.load(source / f"rank-{rank}.pt", weights_only=False) for rank in range(saved_world_size)]
    if saved_world_size == world_size:
        set_rng_state(saved[dist.get_rank()]["rng"])
    else:
        log.warning("checkpoint %s was written by %d ranks, this run has %d: weights, optimizer state, LR schedule, "
                    "step and the data's epoch continue, but RNG states are not restored, so losses won't match a "
                    "run at %d ranks", source, saved_world_size, world_size, saved_world_size)
    return trainer_state, [rank_state["data"] for rank_state in saved]
