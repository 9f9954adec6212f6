"""Which samples each loader worker reads in each epoch of a mixture: pure functions, no I/O.

A source is an endless stream of its samples: cycle after cycle, each cycle all its shards in an
order seeded by (seed, source name, cycle). Epoch e takes from each source the next `take` samples
of its stream (positions e x take to (e + 1) x take; see Mixture.takes): with repeat r, r cycles'
worth, so an integer repeat reads every sample r times per epoch and a fraction reads a seeded
share that the next epochs continue; with weights, each source's share of the epoch.

The epoch's sequence is those runs of samples ("pieces", mostly whole shards) of every source,
shuffled together with a seed per epoch. Position p of an epoch is the p-th sample of its
sequence. The job's ranks x workers each read an equal contiguous slice of the positions
(worker_task), whatever the shard sizes: the job reads each position of an epoch exactly once.
After a resume with another layout, the positions the job had not consumed are split the same
way (open epochs, see pipeline/data/state.py).
"""

import bisect
import functools
import random
from collections.abc import Iterator
from typing import NamedTuple

from pipeline.data.mixture import Mixture

Intervals = list[tuple[int, int]]  # [start, stop) ranges of positions, in order


class Piece(NamedTuple):
    source: int  # index in the mixture
    shard: int  # index in the source's shard list
    start: int  # first sample inside the shard
    stop: int


def cycle_order(num_shards: int, seed: int, name: str, cycle: int) -> list[int]:
    # A str seed is hashed with SHA-512 by random.Random: stable across processes, runs and platforms.
    return random.Random(f"{seed}/{name}/{cycle}").sample(range(num_shards), num_shards)


def source_pieces(sizes: list[int], seed: int, name: str, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard, first sample, stop sample) runs covering positions [start, stop) of a source's stream."""
    total, pieces = sum(sizes), []
    for cycle in range(start // total, -(-stop // total)):
        offset = cycle * total
        for shard in cycle_order(len(sizes), seed, name, cycle):
            low, high = max(start, offset), min(stop, offset + sizes[shard])
            if low < high:
                pieces.append((shard, low - offset, high - offset))
            offset += sizes[shard]
    return pieces


def epoch_pieces(mixture: Mixture, seed: int, epoch: int) -> list[Piece]:
    """The epoch's sequence: every source's take, as pieces, in a seeded order."""
    pieces = [Piece(index, *run)
              for index, (source, take) in enumerate(zip(mixture.sources, mixture.takes()))
              for run in source_pieces(list(source.sizes), seed, source.name, epoch * take, (epoch + 1) * take)]
    random.Random(f"{seed}/epoch/{epoch}").shuffle(pieces)
    return pieces


def in_order_pieces(mixture: Mixture) -> list[Piece]:
    """Every sample once, sources and shards in their listed order (evaluation)."""
    return [
        Piece(i, shard, 0, size) for i, source in enumerate(mixture.sources) for shard, size in enumerate(source.sizes)
    ]


def count(intervals: Intervals) -> int:
    return sum(stop - start for start, stop in intervals)


def slice_intervals(intervals: Intervals, begin: int, end: int) -> Intervals:
    """The positions numbered begin..end-1 (counting in order) of intervals."""
    out, seen = [], 0
    for start, stop in intervals:
        low, high = max(begin - seen, 0), min(end - seen, stop - start)
        if low < high:
            out.append((start + low, start + high))
        seen += stop - start
    return out


def take_share(intervals: Intervals, parts: int, part: int) -> Intervals:
    """The part-th of `parts` equal contiguous shares (sizes differ by at most one) of the positions."""
    total = count(intervals)
    return slice_intervals(intervals, part * total // parts, (part + 1) * total // parts)


def worker_task(length: int, open_epochs: dict[int, Intervals], epoch: int, world_size: int, num_workers: int,
                rank: int, worker: int) -> Intervals:
    """The positions one worker reads in an epoch: its share of the epoch, or of what was left of
    it (open_epochs) when a resume with another layout began in it."""
    positions = open_epochs.get(epoch, [(0, length)])
    return take_share(positions, world_size * num_workers, rank * num_workers + worker)


def merge(positions: list[int], intervals: Intervals = ()) -> Intervals:
    """Sorted, merged intervals of some positions and intervals."""
    ranges = sorted([(p, p + 1) for p in positions] + [tuple(i) for i in intervals if i[0] < i[1]])
    out = []
    for start, stop in ranges:
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


class EpochPieces:
    """An epoch's pieces, looked up by position."""

    def __init__(self, pieces: list[Piece]):
        self.pieces = pieces
        self.starts = [0]
        for piece in pieces:
            self.starts.append(self.starts[-1] + piece.stop - piece.start)

    def __len__(self) -> int:
        return self.starts[-1]

    def runs(self, intervals: Intervals) -> Iterator[tuple[int, Piece]]:
        """(first position, piece) for each stretch of the intervals inside one piece, in order."""
        for start, stop in intervals:
            index = bisect.bisect_right(self.starts, start) - 1
            while start < stop:
                piece, offset = self.pieces[index], start - self.starts[index]
                end = min(stop, self.starts[index + 1])
                yield start, piece._replace(start=piece.start + offset, stop=piece.start + offset + end - start)
                start, index = end, index + 1


@functools.lru_cache(maxsize=4)
def epoch_sequence(mixture: Mixture, seed: int, epoch: int) -> EpochPieces:
    return EpochPieces(epoch_pieces(mixture, seed, epoch))
