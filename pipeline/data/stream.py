"""The sample stream: DataLoader workers read their share of each epoch, shuffle and decode it.

Each worker reads the positions pipeline/data/plan.py gives it, epoch after epoch, in order,
through a shuffle buffer that empties at the epoch's end, and yields one item per position:
"sample" (decoded), "skip" (unusable: its reason is corrupt or invalid) or "placeholder" (a
position consumed before a resume, replayed without reading its bytes). Every item carries its
index in the DataLoader's combined stream (the loader round-robins over workers, so index =
handover.stream_index), its epoch and position, where its worker's epoch began
(epoch, count) and how many of the epoch's positions the worker had read when it yielded it
(the rest of what it read waits in its shuffle buffer or the loader's queue). Items cross to the
main process in handovers of several (pipeline/data/handover.py), which sets the combined order.
"""

import logging
import random
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from pipeline.data.decode import Decoder, SampleError
from pipeline.data.handover import (
    SAMPLES_PER_HANDOVER,
    group_start,
    handing_worker,
    handovers,
    loader_items,
    stream_index,
)
from pipeline.data.mixture import Mixture, load_mixture
from pipeline.data.plan import (
    EpochPieces,
    Intervals,
    count,
    epoch_sequence,
    in_order_pieces,
    slice_intervals,
    take_share,
    worker_task,
)
from pipeline.data.shards import ReadingBoard, ShardError, read_shard
from pipeline.data.state import Progress
from pipeline.data.workers import worker_init
from pipeline.run.config import DataConfig

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor

log = logging.getLogger(__name__)


class SampleStream(IterableDataset):
    """Items (see the module docstring) for one rank, read by DataLoader workers.

    endless=True (training): epochs from first_epoch on, each worker reading its worker_task
    (open_epochs: what was left of epochs begun under another layout, see pipeline/data/state.py).
    endless=False (evaluation): one pass over every sample in shard order, this rank's and
    worker's equal slice of it, unshuffled. replay: per worker, where to restart and which
    positions are still pending (ReplayPlan.workers); None starts afresh. board: where workers
    post the shard they read.
    """

    def __init__(self, mixture: Mixture, decoder: Decoder, rank: int = 0, world_size: int = 1, *, endless: bool = True,
                 seed: int = 0, shuffle_buffer: int = 0, first_epoch: int = 0,
                 open_epochs: dict[int, Intervals] | None = None, replay: list[dict] | None = None,
                 board: ReadingBoard | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.mixture, self.decoder, self.rank, self.world_size = mixture, decoder, rank, world_size
        self.endless, self.seed, self.shuffle_buffer = endless, seed, shuffle_buffer
        self.first_epoch, self.open_epochs, self.replay, self.board = first_epoch, open_epochs or {}, replay, board

    def __iter__(self) -> Iterator[dict]:
        """What a DataLoader worker runs: its items, in handovers."""
        return handovers(self.items())

    def items(self) -> Iterator[dict]:
        """This worker's items, one per position (fillers and placeholders included)."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if not self.endless:
            sequence = EpochPieces(in_order_pieces(self.mixture))
            task = take_share([(0, len(sequence))], self.world_size * num_workers, self.rank * num_workers + worker)
            yield from self.read_epoch(sequence, 0, task, 0, worker, num_workers)
            return
        replay = self.replay[worker] if self.replay else None
        epoch, start = replay["restart"] if replay else (self.first_epoch, 0)
        # Every worker starts at the same count, the start of a handover, so the loader's turns
        # replay the saved order; a worker whose restart point lies further on fills the gap
        # without reading.
        for filler in range(group_start(min(w["restart"][1] for w in self.replay)) if replay else 0, start):
            yield {"kind": "placeholder", "index": stream_index(filler, worker, num_workers), "worker": worker,
                   "epoch": epoch, "epoch_start": (epoch, start), "position": None, "read": 0}
        length = self.mixture.epoch_length()
        while True:
            task = worker_task(length, self.open_epochs, epoch, self.world_size, num_workers, self.rank, worker)
            start = yield from self.read_epoch(epoch_sequence(self.mixture, self.seed, epoch), epoch, task, start,
                                               worker, num_workers, replay)
            epoch += 1

    def read_epoch(self, sequence: EpochPieces, epoch: int, task: Intervals, start: int, worker: int, num_workers: int,
                   replay: dict | None = None) -> Generator[dict, None, int]:
        """Yield one worker's items of one epoch; return its count after them."""
        wanted = pending_positions(replay, epoch, task)
        read = 0

        def raw_samples() -> Iterator[dict]:
            nonlocal read
            for first, piece in sequence.runs(task):
                url = self.mixture.sources[piece.source].urls[piece.shard]
                if self.board is not None:
                    self.board.set(worker, url)
                for offset, sample in enumerate(read_shard(url, piece.start, piece.stop,
                                                           lambda k: wanted(first + k - piece.start))):
                    read += 1
                    yield {"position": first + offset, "source": piece.source, "url": url, "sample": sample}

        raw = raw_samples()
        if self.endless and self.shuffle_buffer > 1:
            shuffle_seed = f"{self.seed}/{epoch}/{self.rank}/{self.world_size}/{worker}/shuffle"
            raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(shuffle_seed))(raw)
        count, logged = start, None
        for entry in raw:
            sample = entry["sample"]
            item = {"index": stream_index(count, worker, num_workers), "worker": worker, "epoch": epoch,
                    "epoch_start": (epoch, start), "position": entry["position"], "read": read,
                    "source": entry["source"], "shard": entry["url"],
                    "key": sample.get("__key__") if isinstance(sample, dict) else None}
            count += 1
            if sample is None:
                item["kind"] = "placeholder"
            elif isinstance(sample, ShardError):
                if sample is not logged:  # one message for all the samples a damaged shard loses
                    log.warning("skipping unreadable shard data: %s", sample)
                    logged = sample
                item.update(kind="skip", reason="corrupt")
            else:
                try:
                    item.update(self.decoder(sample), kind="sample")
                except SampleError as exn:
                    log.warning("skipping %s", exn)  # the message names the shard and key
                    item.update(kind="skip", reason=exn.reason)
            yield item
        return count


def pending_positions(replay: dict | None, epoch: int, task: Intervals) -> Callable[[int], bool]:
    """Whether a position of this epoch must be read: always, except when replaying after a
    resume, where only the positions not consumed before it are (the others become placeholders)."""
    if replay is None or epoch > replay["epoch"]:
        return lambda position: True
    pending = set(replay["pending"].get(epoch, ()))
    unread = slice_intervals(task, replay["read"], count(task)) if epoch == replay["epoch"] else []
    return lambda position: position in pending or any(a <= position < b for a, b in unread)


class RankStream:
    """One rank's items from its DataLoader workers (SampleStream), in the loader's order, and what
    the main process knows of each worker's progress, for the resume state (pipeline/data/state.py).

    Starts afresh at first_epoch or, with `replay` (state.replay_plan of a state of this same
    layout), restarts each worker where the plan says; open_epochs: see SampleStream.
    """

    def __init__(self, mixture: Mixture, decoder: Decoder, cfg: DataConfig, rank: int, world_size: int,
                 first_epoch: int, open_epochs: dict[int, Intervals], replay: list[dict] | None = None):
        self.rank, self.world_size, self.timeout = rank, world_size, cfg.read_timeout_s
        self.num_workers, self.length, self.open_epochs = max(1, cfg.num_workers), mixture.epoch_length(), open_epochs
        restarts = [w["restart"] for w in replay] if replay else [(first_epoch, 0)] * self.num_workers
        self.latest = list(restarts)  # per worker: epoch_start of its newest item
        self.progress = [Progress(epoch) for epoch, _ in restarts]
        self.pulled = group_start(min(start for _, start in restarts)) * self.num_workers
        self.board = ReadingBoard(self.num_workers)
        stream = SampleStream(mixture, decoder, rank, world_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                              first_epoch=first_epoch, open_epochs=open_epochs, replay=replay, board=self.board)
        # Workers keep about a packing window of samples ready while the trainer steps; with
        # DataLoader's default (2 handovers per worker) they idle, and the next batch waits on them.
        per_worker = -(-cfg.pack_window // (self.num_workers * SAMPLES_PER_HANDOVER))
        prefetch = max(2, per_worker) if cfg.num_workers else None
        self.items = loader_items(stream, cfg.num_workers, prefetch_factor=prefetch,
                                  timeout=self.timeout if cfg.num_workers else 0,
                                  worker_init_fn=worker_init())

    @property
    def epoch(self) -> int:
        """The oldest epoch a worker of this rank is still reading."""
        return min(epoch for epoch, _ in self.latest)

    def pull(self) -> dict:
        try:
            item = next(self.items)
        except RuntimeError as exn:
            if "timed out" not in str(exn):
                raise
            worker = handing_worker(self.pulled, self.num_workers)
            raise TimeoutError(f"rank {self.rank}: data loader worker {worker} delivered nothing for "
                               f"{self.timeout:g} s (data.read_timeout_s); it was reading "
                               f"{self.board.get(worker) or 'no shard yet'}") from None
        if item["index"] != self.pulled:
            raise RuntimeError(f"rank {self.rank}: stream item {item['index']} arrived at position {self.pulled}")
        self.pulled += 1
        worker, epoch = item["worker"], item["epoch"]
        self.latest[worker] = tuple(item["epoch_start"])
        if item["position"] is not None:  # not a filler
            task = worker_task(
                self.length, self.open_epochs, epoch, self.world_size, self.num_workers, self.rank, worker
            )
            self.progress[worker].update(epoch, item["read"], item["position"], task)
        return item

    def state(self, waiting: list) -> dict:
        """The stream's part of the resume state, given the items still waiting in the pack window:
        per worker its progress and the epoch start to replay from (the oldest of its newest
        item's and its waiting ones'); what is left of epochs begun under another layout."""
        restart = list(self.latest)
        for item in waiting:
            restart[item["worker"]] = min(restart[item["worker"]], tuple(item["epoch_start"]))
        oldest = min(epoch for epoch, _ in restart)
        return {"open_epochs": [[e, [list(i) for i in intervals]] for e, intervals in sorted(self.open_epochs.items())
                                if e >= oldest],
                "pulled": self.pulled,
                "workers": [{**p.as_dict(), "restart": list(r)} for p, r in zip(self.progress, restart)]}


def iter_samples(shards: str | Path, tokenizer: PreTrainedTokenizerBase, image_processor: "BaseImageProcessor",
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, with_record: bool = True,
                 max_tiles: int | None = None) -> Iterator[dict]:
    """Each sample of data.shards (a mixture's sources in turn) once, this rank's equal share, in a
    fixed order (for evaluation).

    Yields dicts with input_ids, labels, pixel_values ((tiles, 3, H, W) uint8 or None) and image_grids
    (images prepared the way the image processor records, see set_image_aspect and set_tiling;
    max_tiles overrides its tile limit), key, shard and, with_record, the record itself,
    prompt_ids (for generation) and answer (the last reply). Unusable samples are logged and left out.
    """
    decoder = Decoder(tokenizer, image_processor, with_record=with_record, max_tiles=max_tiles)
    stream = SampleStream(load_mixture(str(shards)), decoder, rank, world_size, endless=False)
    for item in loader_items(stream, num_workers):
        if item["kind"] == "sample":
            yield item
