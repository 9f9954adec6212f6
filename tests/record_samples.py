"""Test-only entry point: pipeline.train that also records, per rank, the samples of every step.

    RECORD_SAMPLES=FOLDER python -m tests.record_samples CONFIG [key=value ...]

Each rank appends one line per optimizer step to FOLDER/rank-<r>.jsonl: the [source, shard, key,
epoch] of every sample its micro-batches packed (TrainBatches' stats["samples"], as
pipeline.train.step.train_step returns them).
"""

import json
import os
import sys
from pathlib import Path

from pipeline.train import loop
from pipeline.train.entry import main

real_train_step = loop.train_step


def recording_train_step(*args, **kwargs):
    loss, stats = real_train_step(*args, **kwargs)
    folder = Path(os.environ["RECORD_SAMPLES"])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank-{os.environ['RANK']}.jsonl", "a") as f:
        f.write(json.dumps([sample for micro_batch in stats for sample in micro_batch["samples"]]) + "\n")
    return loss, stats


loop.train_step = recording_train_step

if __name__ == "__main__":
    sys.exit(main())
