"""The data stream's resume state: small, and meaningful to any number of ranks and workers.

Each rank saves, per loader worker, the epoch it reads, how many of that epoch's positions it has
read (`read`) and which of those it had not yet delivered (`missing`: in its shuffle buffer or the
loader's queue), plus the positions waiting in the pack window. The job has consumed exactly the
positions read and delivered and not waiting; nothing is stored per consumed sample, so a state
holds about one entry per worker plus the samples in flight.

Resuming with the same ranks and workers replays each worker's stream from the start of the
oldest epoch it still owes, reading only the pending positions, so batches come out bit for bit as
in an uninterrupted run (ReplayPlan). With another layout, the positions not consumed in each
epoch some worker had begun are gathered from every rank's state (remaining_positions) and split
into equal shares for the new ranks x workers ("open epochs"); later epochs are planned for the
new layout as usual. Either way no position of an epoch is consumed twice or skipped.
"""

from collections.abc import Iterable

from pipeline.data.plan import Intervals, count, merge, slice_intervals, worker_task

VERSION = 3


class Progress:
    """What the main process knows of one worker's current epoch (see the module docstring)."""

    def __init__(self, epoch: int, read: int = 0, missing: Iterable[int] = ()):
        self.epoch, self.read, self.missing = epoch, read, set(missing)

    def update(self, epoch: int, read: int, position: int, task: Intervals) -> None:
        """An item of `epoch` arrived, yielded when its worker had read `read` positions of `task`."""
        if epoch != self.epoch:  # a worker's shuffle buffer empties before its next epoch begins
            self.epoch, self.read, self.missing = epoch, 0, set()
        for start, stop in slice_intervals(task, self.read, read):
            self.missing.update(range(start, stop))
        self.read = max(self.read, read)
        self.missing.discard(position)

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "read": self.read, "missing": sorted(self.missing)}


def open_epochs_of(state: dict) -> dict[int, Intervals]:
    return {int(epoch): [tuple(i) for i in intervals] for epoch, intervals in state["open_epochs"]}


def remaining_positions(states: list[dict], length: int) -> dict[int, Intervals]:
    """Per epoch that some worker of `states` (every rank's state, in rank order) had begun and not
    every position of which was consumed: the positions not consumed, job-wide."""
    layout = states[0]["layout"]
    world_size, num_workers = layout["world_size"], layout["num_workers"]
    open_epochs = {e: i for state in states for e, i in open_epochs_of(state).items()}
    workers = [
        (state["layout"]["rank"], w, progress) for state in states for w, progress in enumerate(state["workers"])
    ]
    window = [(epoch, position) for state in states for _, epoch, position, _ in state["window"]]
    first = min([p["epoch"] for _, _, p in workers] + [epoch for epoch, _ in window])
    last = max(p["epoch"] for _, _, p in workers)
    remaining = {}
    for epoch in range(first, last + 1):
        intervals, points = [], [position for e, position in window if e == epoch]
        for rank, worker, progress in workers:
            task = worker_task(length, open_epochs, epoch, world_size, num_workers, rank, worker)
            if progress["epoch"] < epoch:
                intervals += task
            elif progress["epoch"] == epoch:
                intervals += slice_intervals(task, progress["read"], count(task))
                points += progress["missing"]
        remaining[epoch] = merge(points, intervals)
    return remaining


def check_compatible(state: dict, identity: dict) -> None:
    if state.get("version") != VERSION:
        raise ValueError(f"data state version {state.get('version')!r} is not {VERSION}: it was written by an "
                         f"older pipeline; start the data afresh in a new train.output_dir (model.init_from)")
    changed = [key for key in identity if state["identity"].get(key) != identity[key]]
    if changed:
        raise ValueError(f"data state was saved with a different {' and '.join(changed)} (data.shards, data.seed): "
                         f"its positions mean other samples now; keep the data of the checkpoint, or start the "
                         f"data afresh in a new train.output_dir (model.init_from)")


def summed_counters(states: list[dict]) -> dict:
    """Every rank's running counters added up: the job's totals, which one rank carries on after a
    resume with another layout (the others start at zero), so sums over ranks stay exact."""
    total = {}
    for state in states:
        for key, value in state["counters"].items():
            if isinstance(value, dict):
                inner = total.setdefault(key, {})
                for name, n in value.items():
                    inner[name] = inner.get(name, 0) + n
            else:
                total[key] = total.get(key, 0) + value
    return total


def replay_plan(state: dict) -> list[dict]:
    """Per worker of a same-layout resume: where its stream restarts (epoch, count), the epoch it
    had reached and how far it had read it, and per epoch the positions still pending."""
    plan = []
    for worker, progress in enumerate(state["workers"]):
        pending = {progress["epoch"]: list(progress["missing"])}
        for w, epoch, position, _ in state["window"]:
            if w == worker:
                pending.setdefault(epoch, []).append(position)
        plan.append({"restart": tuple(progress["restart"]), "epoch": progress["epoch"], "read": progress["read"],
                     "pending": pending})
    return plan
