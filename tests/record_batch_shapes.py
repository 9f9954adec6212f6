"""Test-only entry point: pipeline.train that also records, per rank, the shapes of every batch.

    python -m tests.record_batch_shapes CONFIG [key=value ...]

Each rank appends one line per micro-batch to $RECORD_BATCH_SHAPES/rank-<r>.jsonl: N and the frame
count M, the shape of every tensor of the batch, and the real images, tiles and video frames in it.
"""

import json
import os
import sys
from pathlib import Path

from pipeline.data.batches import TrainBatches
from pipeline.train.entry import main

real_next_batch = TrainBatches.next_batch


def recording_next_batch(self, num_vision_tokens, num_frame_tokens=None):
    batch = real_next_batch(self, num_vision_tokens, num_frame_tokens)
    folder = Path(os.environ["RECORD_BATCH_SHAPES"])
    folder.mkdir(parents=True, exist_ok=True)
    record = {"n": num_vision_tokens, "m": num_frame_tokens,
              "shapes": {k: list(v.shape) for k, v in batch.items() if k != "stats"},
              "images": batch["stats"]["num_images"], "tiles": batch["stats"]["num_tiles"],
              "frames": batch["stats"]["num_frames"], "grids": batch["image_grids"].tolist()}
    with open(folder / f"rank-{os.environ['RANK']}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return batch


TrainBatches.next_batch = recording_next_batch

if __name__ == "__main__":
    sys.exit(main())
