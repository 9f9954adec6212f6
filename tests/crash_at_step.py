"""Test-only entry point: pipeline.train with a fault injected at optimizer step FAULT_AT_STEP.

    FAULT_AT_STEP=3 FAULT_RAISE_RANK=1 python -m tests.crash_at_step CONFIG [key=value ...]

At that step, the rank FAULT_RAISE_RANK raises (after writing the file FAULT_MARKER, when set,
so that a test can time what follows), and the rank FAULT_STALL_RANK, when set, sleeps instead
of training, as a rank blocked in an NCCL collective would: blind to its peer's death.
"""

import os
import sys
import time
from pathlib import Path

from pipeline.train import loop
from pipeline.train.entry import main

AT_STEP = int(os.environ["FAULT_AT_STEP"])
RAISE_RANK = os.environ["FAULT_RAISE_RANK"]
STALL_RANK = os.environ.get("FAULT_STALL_RANK")
real_train_step = loop.train_step
steps = 0


def faulty_train_step(*args, **kwargs):
    global steps
    steps += 1
    if steps == AT_STEP:
        rank = os.environ["RANK"]  # set by pipeline.train.distributed.distributed_env, also under srun
        if rank == RAISE_RANK:
            if "FAULT_MARKER" in os.environ:
                Path(os.environ["FAULT_MARKER"]).write_text(str(time.time()))
            raise RuntimeError(f"injected fault on rank {rank} at step {steps}")
        if rank == STALL_RANK:
            time.sleep(3600)
    return real_train_step(*args, **kwargs)


loop.train_step = faulty_train_step

if __name__ == "__main__":
    sys.exit(main())
