"""Test-only entry point: pipeline.train that also records, per rank, the shapes of every batch.

    python -m tests.record_batch_shapes CONFIG [key=value ...]

Each rank appends one line per micro-batch to <output_dir>/batch_shapes/rank-<r>.jsonl: N, the
shape of every tensor of the batch, and the real images and tiles in it.
"""

import json
import os
import sys
from pathlib import Path

from pipeline.data.batches import TrainBatches
from pipeline.train.entry import main

real_next_batch = TrainBatches.next_batch


def recording_next_batch(self, num_vision_tokens):
    batch = real_next_batch(self, num_vision_tokens)
    folder = Path(os.environ["RECORD_BATCH_SHAPES"])
    folder.mkdir(parents=True, exist_ok=True)
    record = {"n": num_vision_tokens, "shapes": {k: list(v.shape) for k, v in batch.items() if k != "stats"},
              "images": batch["stats"]["num_images"], "tiles": batch["stats"]["num_tiles"],
              "grids": batch["image_grids"].tolist()}
    with open(folder / f"rank-{os.environ['RANK']}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return batch


TrainBatches.next_batch = recording_next_batch

if __name__ == "__main__":
    sys.exit(main())
