"""pipeline/data/plan.py and state.py, without a loader: what each epoch of a mixture holds, the
workers' equal slices of it, and the resume state's arithmetic at the same and other layouts."""

import collections
import random

import pytest

from pipeline.data.mixture import Mixture, Source
from pipeline.data.plan import (
    EpochPieces,
    count,
    epoch_pieces,
    merge,
    slice_intervals,
    take_share,
    worker_task,
)
from pipeline.data.state import Progress, remaining_positions

UNEVEN = (40, 40, 40, 40, 20)


def source(name, sizes, **share):
    return Source(name, name, tuple(f"{name}/shard-{i:06d}.tar" for i in range(len(sizes))), tuple(sizes), **share)


def samples_of(pieces, mixture):
    """Counter of (source name, shard, sample) over pieces."""
    return collections.Counter(
        (mixture.sources[p.source].name, p.shard, k) for p in pieces for k in range(p.start, p.stop)
    )


def every_sample(src, times=1):
    return collections.Counter(
        {(src.name, shard, k): times for shard, size in enumerate(src.sizes) for k in range(size)}
    )


def test_repeat_counts_give_exact_epochs_and_fractions_continue_across_epochs():
    once, twice, half = (
        source("once", UNEVEN, repeat=1),
        source("twice", (7, 5), repeat=2),
        source("half", (30, 4), repeat=0.5),
    )
    mixture = Mixture((once, twice, half))
    assert mixture.takes() == [180, 24, 17] and mixture.epoch_length() == 221
    halves = collections.Counter()
    for epoch in range(4):
        got = samples_of(epoch_pieces(mixture, 0, epoch), mixture)
        assert sum(got.values()) == 221
        assert {k: v for k, v in got.items() if k[0] == "once"} == every_sample(once)
        assert {k: v for k, v in got.items() if k[0] == "twice"} == every_sample(twice, 2)
        halves.update({k: v for k, v in got.items() if k[0] == "half"})
        if epoch % 2:  # a seeded half each epoch, the other half the next: every sample once per two epochs
            assert halves == every_sample(half, (epoch + 1) // 2)


def test_weights_share_each_epoch_and_cycle_through_each_source():
    big, small = source("big", (100, 60), weight=3), source("small", (20,), weight=1)
    mixture = Mixture((big, small))
    assert mixture.mode == "weight" and mixture.takes() == [135, 45]  # 180 samples an epoch, 3:1
    taken = collections.Counter()
    for epoch in range(4):
        taken.update(samples_of(epoch_pieces(mixture, 0, epoch), mixture))
    # 4 x 45 = 180 samples of a 20-sample source: 9 full cycles; 4 x 135 = 540 of 160: 3 cycles + 60
    assert {v for k, v in taken.items() if k[0] == "small"} == {9}
    assert sorted(collections.Counter(v for k, v in taken.items() if k[0] == "big").items()) == [(3, 100), (4, 60)]


def test_an_epoch_is_one_seeded_stream_of_all_sources():
    mixture = Mixture((source("a", UNEVEN, repeat=1), source("b", (40, 40), repeat=1)))
    first = epoch_pieces(mixture, 0, 0)
    assert first == epoch_pieces(mixture, 0, 0)  # a pure function
    assert first != epoch_pieces(mixture, 0, 1) and first != epoch_pieces(mixture, 1, 0)
    order = [p.source for p in first]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # sources interleave


@pytest.mark.parametrize("ranks, workers", [(1, 1), (2, 2), (3, 5), (7, 3)])
def test_workers_get_equal_slices_whatever_the_shard_sizes(ranks, workers):
    length = sum(UNEVEN)
    tasks = [worker_task(length, {}, 0, ranks, workers, r, w) for r in range(ranks) for w in range(workers)]
    sizes = [count(t) for t in tasks]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == length
    assert merge([], [i for t in tasks for i in t]) == [(0, length)]  # disjoint (sizes add up) and covering


def test_shares_of_scattered_positions():
    positions = [(3, 7), (10, 11), (20, 30)]  # 15 positions
    shares = [take_share(positions, 4, part) for part in range(4)]
    assert [count(s) for s in shares] == [3, 4, 4, 4]
    assert [p for s in shares for a, b in s for p in range(a, b)] == [p for a, b in positions for p in range(a, b)]
    assert slice_intervals(positions, 2, 6) == [(5, 7), (10, 11), (20, 21)]


def test_sequence_runs_find_each_positions_sample():
    mixture = Mixture((source("a", UNEVEN, repeat=1), source("b", (9, 4), repeat=1)))
    pieces = epoch_pieces(mixture, 3, 2)
    flat = [(p.source, p.shard, k) for p in pieces for k in range(p.start, p.stop)]
    sequence = EpochPieces(pieces)
    intervals = [(0, 5), (37, 90), (140, len(flat))]
    found = [
        (piece.source, piece.shard, k)
        for first, piece in sequence.runs(intervals)
        for k in range(piece.start, piece.stop)
    ]
    assert found == [flat[p] for a, b in intervals for p in range(a, b)]
    assert all(piece.stop - piece.start > 0 for _, piece in sequence.runs(intervals))


def test_progress_knows_what_a_worker_read_but_has_not_delivered():
    task = [(100, 110), (200, 205)]
    progress = Progress(epoch=3)
    progress.update(3, 6, 104, task)  # read 100..105, delivered 104
    assert progress.as_dict() == {"epoch": 3, "read": 6, "missing": [100, 101, 102, 103, 105]}
    progress.update(3, 12, 200, task)  # read on to 201
    assert progress.missing == {100, 101, 102, 103, 105, 106, 107, 108, 109, 201}
    progress.update(4, 1, 0, [(0, 10)])  # its next epoch: the last one was all delivered
    assert progress.as_dict() == {"epoch": 4, "read": 1, "missing": []}


def simulate(length, layout, open_epochs, rng, consumed):
    """Every rank's state after each worker of `layout` (ranks, workers) has consumed a random
    part of the epochs open to it: all of epoch `first` for some workers, some of the next for
    others; read-ahead (missing) and window samples are left unconsumed. `consumed` (a Counter of
    (epoch, position)) gets what was consumed. Returns the states."""
    ranks, workers = layout
    first = min(open_epochs, default=0)
    states = []
    for rank in range(ranks):
        state = {"layout": {"rank": rank, "world_size": ranks, "num_workers": workers},
                 "open_epochs": [[e, i] for e, i in open_epochs.items()], "workers": [], "window": []}
        for worker in range(workers):
            epoch = first + rng.randrange(2)
            for done in range(first, epoch):  # earlier epochs: all consumed but a window sample or two
                positions = [p for a, b in worker_task(length, open_epochs, done, ranks, workers, rank, worker)
                             for p in range(a, b)]
                waiting = rng.sample(positions, min(2, len(positions)))
                state["window"] += [[worker, done, p, 0] for p in waiting]
                consumed.update((done, p) for p in positions if p not in waiting)
            task = worker_task(length, open_epochs, epoch, ranks, workers, rank, worker)
            positions = [p for a, b in task for p in range(a, b)]
            read = rng.randrange(len(positions) + 1)
            missing = rng.sample(positions[:read], min(3, read))
            delivered = [p for p in positions[:read] if p not in missing]
            waiting = rng.sample(delivered, min(2, len(delivered)))
            state["window"] += [[worker, epoch, p, 0] for p in waiting]
            consumed.update((epoch, p) for p in delivered if p not in waiting)
            state["workers"].append({"epoch": epoch, "read": read, "missing": sorted(missing)})
        states.append(state)
    return states


@pytest.mark.parametrize("layouts", [[(2, 2), (1, 3), (3, 1)], [(1, 1), (2, 2), (4, 3)]])
def test_resumes_at_other_layouts_leave_exactly_what_was_not_consumed(layouts):
    length, rng, consumed = sum(UNEVEN), random.Random(5), collections.Counter()
    open_epochs = {}
    for layout in layouts:
        states = simulate(length, layout, open_epochs, rng, consumed)
        open_epochs = remaining_positions(states, length)
        assert max(consumed.values()) == 1  # nothing consumed twice, through every resume so far
        for epoch, intervals in open_epochs.items():
            left = {p for a, b in intervals for p in range(a, b)}
            assert left == {p for p in range(length) if (epoch, p) not in consumed}, (layout, epoch)
