"""Reading webdataset shards: samples by their index inside a tar, without reading the ones not wanted.

A shard is a tar whose consecutive members sharing a key (webdataset's rule: the name up to the
first dot of its base name) form one sample. Opened for random access, tarfile steps from header
to header with a seek, so reaching sample k of a shard reads k samples' headers, not their bytes.
"""

import ctypes
import multiprocessing
import re
import tarfile
from collections.abc import Callable, Iterator

from webdataset.tariterators import base_plus_ext

META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not sample data


class ShardError(Exception):
    """A sample its shard could not give: damaged, truncated, unreadable or shorter than planned."""


def _members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, key, extension) of each sample file, in tar order."""
    for member in tar:
        if member.isreg() and not META_NAME.match(member.name):
            key, extension = base_plus_ext(member.name)
            if key is not None:
                yield member, key, extension.lower()


def read_shard(url: str, start: int, stop: int, wanted: Callable[[int], bool]) -> Iterator[dict | None | ShardError]:
    """Samples start..stop-1 of a shard, in order, one entry each: the sample (its members' bytes
    by extension, __key__, __url__) when wanted(index), else None (its bytes are never read); a
    ShardError for every sample the shard cannot give (damage ends the shard)."""
    index, sample = -1, None
    try:
        with open(url, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
            for member, key, extension in _members(tar):
                if sample is None or key != sample["__key__"]:
                    if index >= start:
                        yield sample if wanted(index) else None
                    index += 1
                    if index == stop:
                        return
                    sample = {"__key__": key, "__url__": url}
                if index >= start and wanted(index):
                    sample[extension] = tar.extractfile(member).read()
        if index >= start:
            yield sample if wanted(index) else None
        first_missing = max(index + 1, start)
        error = ShardError(f"shard {url} has {index + 1} samples, fewer than the {stop} planned "
                           f"(rewritten after its manifest?)")
    except (OSError, tarfile.TarError) as exn:  # a broken tar raises either, at any member
        first_missing = max(index, start)  # the sample being read when the damage came is lost too
        error = ShardError(f"shard {url} unreadable from sample {first_missing} on: {exn!r}")
    for _ in range(first_missing, stop):
        yield error


def count_samples(url: str) -> int:
    """Samples in a shard, from its headers alone; a damaged shard counts the samples before the damage."""
    keys = 0
    previous = None
    try:
        with open(url, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
            for _, key, _ in _members(tar):
                keys += key != previous
                previous = key
    except (OSError, tarfile.TarError):
        # The last sample may be cut short; reading it gives a ShardError, counted as a skip.
        pass
    return keys


def holds_member(url: str, extensions: tuple[str, ...]) -> bool:
    """Whether a shard holds a sample file with one of these extensions, from its headers alone."""
    try:
        with open(url, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
            return any(extension.rsplit(".", 1)[-1] in extensions for _, _, extension in _members(tar))
    except (OSError, tarfile.TarError):  # the stream reports a damaged shard when it reads it
        return False


class ReadingBoard:
    """Which shard each loader worker is reading, in memory shared with the workers, so that the
    main process can name it when a worker stops delivering."""

    SIZE = 1024  # bytes per worker's entry

    def __init__(self, num_workers: int):
        self.entries = multiprocessing.Array(ctypes.c_char, self.SIZE * max(1, num_workers), lock=False)

    def set(self, worker: int, text: str) -> None:
        data = text.encode()[:self.SIZE - 1]
        self.entries[worker * self.SIZE:worker * self.SIZE + len(data) + 1] = data + b"\0"

    def get(self, worker: int) -> str:
        return self.entries[worker * self.SIZE:(worker + 1) * self.SIZE].split(b"\0", 1)[0].decode(errors="replace")
