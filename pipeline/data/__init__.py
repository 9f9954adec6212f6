"""The training data: building shards from data as it is published, what to train on, which
samples each worker reads, reading and decoding them, packing them into batches, and resuming at
any world size.

    sources.py  an input's rows by index: LLaVA JSON/JSONL, parquet, save_to_disk, hub names
    schemas.py  the conversation schemas (llava, cauldron, messages): a row -> LLaVA record + images
    builder.py  shards built in slices (processes, Slurm array tasks), resumable; image validation

    mixture.py  sources (shard folders) with repeat counts or weights, from data.shards
    plan.py     which positions of each epoch every rank's workers read: pure functions
    shards.py   reading samples out of tar shards by index
    decode.py   sample bytes -> token ids, labels, pixel values
    stream.py   the DataLoader workers' stream of items; evaluation's one pass (iter_samples)
    workers.py  the training loader's worker processes beside their training process (signals, exit)
    handover.py how items cross from the workers, in groups with one pixel tensor, and their order
    state.py    the small resume state, replayed at the same layout, split at another
    packing.py  which samples fill each row: pure functions of lengths and tile counts
    assemble.py a packed batch from the samples chosen for its rows (PackedBatch)
    batches.py  packed batches for one rank, resumable (TrainBatches)
"""

from pipeline.data.batches import TrainBatches
from pipeline.data.stream import iter_samples

__all__ = ["TrainBatches", "iter_samples"]
