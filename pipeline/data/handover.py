"""How items cross the DataLoader's worker boundary, and in what order they arrive.

A worker hands its items over in groups of SAMPLES_PER_HANDOVER consecutive ones, the group's
pixels in one tensor. torch's DataLoader passes every tensor through a shared-memory segment of
its own and a file descriptor sent over a fresh, authenticated socket: per tensor about 1 ms of
the worker's CPU and as much of the training process's on the dev machine (bench/loader_results.md).
One tensor per group pays that once for all its samples.

The loader takes one handover from each worker in turn, so the combined stream is worker 0's first
group, worker 1's first group, ..., then worker 0's second group, and so on (stream_index).
"""

import os
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

SAMPLES_PER_HANDOVER = 8


def stream_index(count: int, worker: int, num_workers: int) -> int:
    """Where a worker's count-th item arrives in the combined stream."""
    group, offset = divmod(count, SAMPLES_PER_HANDOVER)
    return (group * num_workers + worker) * SAMPLES_PER_HANDOVER + offset


def handing_worker(index: int, num_workers: int) -> int:
    """The worker whose handover holds the item at this index of the combined stream."""
    return index // SAMPLES_PER_HANDOVER % num_workers


def group_start(count: int) -> int:
    """The count of the first item in the handover holding a worker's count-th item: restarting
    every worker there keeps the loader's turns as they were."""
    return count - count % SAMPLES_PER_HANDOVER


def handovers(items: Iterable[dict]) -> Iterator[dict]:
    """A worker's items (each with its stream index) grouped into handovers; the last may be short."""
    group = []
    for item in items:
        group.append(item)
        if item["index"] % SAMPLES_PER_HANDOVER == SAMPLES_PER_HANDOVER - 1:
            yield pack(group)
            group = []
    if group:
        yield pack(group)


def pack(items: list[dict]) -> dict:
    """One handover: the items, each pixel tensor replaced by its tile count, and all of them in one tensor."""
    pixels = []
    for item in items:
        if isinstance(item.get("pixel_values"), torch.Tensor):
            pixels.append(item["pixel_values"])
            item["pixel_values"] = len(item["pixel_values"])
    return {"items": items, "pixels": torch.cat(pixels) if pixels else None}


def unpack(handover: dict) -> list[dict]:
    """The handover's items with their pixels back. Each gets a copy of its own: a view would keep
    the whole group's shared memory alive while one item waits in the pack window."""
    offset = 0
    for item in handover["items"]:
        if isinstance(item.get("pixel_values"), int):
            tiles = item["pixel_values"]
            item["pixel_values"] = handover["pixels"][offset:offset + tiles].clone()
            offset += tiles
    return handover["items"]


def as_is(handover: dict) -> dict:
    """The loader's collate_fn: DataLoader's default (default_convert) walks every token id of every
    item, about 0.4 ms a sample, to change nothing."""
    return handover


def loader_items(stream: IterableDataset, num_workers: int, **loader_options) -> Iterator[dict]:
    """A stream's items (its __iter__ yields handovers), read by num_workers DataLoader workers (0:
    in this process), in the combined order."""
    if num_workers:  # workers fork after the tokenizer is built: its thread pool must not be in use then
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=as_is, **loader_options)
    for handover in loader:
        yield from unpack(handover)
