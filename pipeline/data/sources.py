"""Reading the rows of a data set as it is published, by index, for tools.build_shards.

An input is one of:
  LLaVA JSON (a list) or JSON Lines (.jsonl)   a record per row; an unparsable line is None
  parquet: one file, a folder (its *.parquet files, recursively, in path order) or a glob
                                               read with pyarrow, a row group at a time, no copy
  a `datasets` save_to_disk folder             datasets.load_from_disk (a DatasetDict: --split)
  anything else: a hub dataset name            datasets.load_dataset(name, subset, split=split):
                                               offline (HF_HUB_OFFLINE=1) from the local cache
Rows come back as plain Python values with nothing decoded: an image column of `datasets`
(Image, or a list of them) is {"bytes": ..., "path": ...} per image, as stored.
"""

import bisect
import glob
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # for annotations only: datasets is imported where a build reads one
    import datasets

GLOB_CHARACTERS = "*?["
COLUMN_SAMPLE = 1000  # JSON records whose keys name the input's columns


class InputError(ValueError):
    """An input that can't be read: missing, empty, or not a form listed above."""


class JsonRows:
    """A LLaVA JSON list or JSON Lines file, held in memory."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise InputError(f"{path} not found")
        with open(path) as f:
            if path.endswith(".jsonl"):
                self.records = [_json_line(line) for line in f if line.strip()]
            else:
                try:
                    self.records = json.load(f)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path} is not valid JSON ({error}); JSON Lines files must end in .jsonl")
        if not isinstance(self.records, list):
            raise InputError(f"{path}: expected a JSON list of records, got {type(self.records).__name__}")
        self.path = path
        self.columns = sorted({key for record in self.records[:COLUMN_SAMPLE] if isinstance(record, dict)
                               for key in record})

    def __len__(self) -> int:
        return len(self.records)

    def read(self, indices: Sequence[int]) -> list:
        return [self.records[i] for i in indices]

    def identity(self) -> dict:
        return {"files": [_file_identity(self.path)]}


def _json_line(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None  # a malformed row, counted as such by the build


class ParquetRows:
    """Parquet files read as one table, in the order of their paths."""

    def __init__(self, files: list[str]):
        self.files = files
        self.groups, self.starts, columns, total = [], [], {}, 0
        for path in files:
            metadata = pq.ParquetFile(path).metadata
            for name in metadata.schema.to_arrow_schema().names:
                columns.setdefault(name, None)
            for group in range(metadata.num_row_groups):
                self.groups.append((path, group))
                self.starts.append(total)
                total += metadata.row_group(group).num_rows
        self.columns, self.num_rows = list(columns), total
        self._open = {}

    def __len__(self) -> int:
        return self.num_rows

    def read(self, indices: Sequence[int]) -> list:
        """The rows at `indices`, in that order; each row group they touch is read once."""
        by_group = {}
        for index in sorted(set(indices)):
            by_group.setdefault(bisect.bisect_right(self.starts, index) - 1, []).append(index)
        rows = {}
        for group, wanted in by_group.items():
            path, number = self.groups[group]
            if path not in self._open:
                self._open[path] = pq.ParquetFile(path)
            table = self._open[path].read_row_group(number)
            rows.update(zip(wanted, table.take(pa.array([i - self.starts[group] for i in wanted])).to_pylist()))
        return [rows[i] for i in indices]

    def identity(self) -> dict:
        return {"files": [_file_identity(path) for path in self.files]}


class DatasetRows:
    """A `datasets` Dataset (memory-mapped arrow), read without its features' decoding."""

    def __init__(self, dataset: "datasets.Dataset", description: str):
        self.dataset = dataset.with_format("arrow")
        self.columns, self.description = list(dataset.column_names), description

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, indices: Sequence[int]) -> list:
        return self.dataset[list(indices)].to_pylist() if len(indices) else []

    def identity(self) -> dict:
        return {"dataset": self.description, "fingerprint": self.dataset._fingerprint}


def parquet_files(spec: str) -> list[str]:
    """The parquet files an input names (a file, a folder or a glob), sorted; [] if it names none."""
    if any(c in spec for c in GLOB_CHARACTERS):
        return sorted(p for p in glob.glob(spec, recursive=True) if p.endswith(".parquet"))
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "**", "*.parquet"), recursive=True))
    return [spec] if spec.endswith(".parquet") and os.path.isfile(spec) else []


def is_saved_dataset(path: str) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def open_rows(spec: str, subset: str | None = None, split: str = "train") -> JsonRows | ParquetRows | DatasetRows:
    """The rows of an input (see the module docstring); InputError names what is wrong."""
    if spec.endswith((".json", ".jsonl")):
        return JsonRows(spec)
    files = parquet_files(spec)
    if files:
        return ParquetRows(files)
    if spec.endswith(".parquet") or any(c in spec for c in GLOB_CHARACTERS):
        raise InputError(f"{spec}: no parquet file found")
    import datasets  # only these inputs need it, and it is slow to import

    if os.path.isdir(spec) and is_saved_dataset(spec):
        dataset = datasets.load_from_disk(spec)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise InputError(f"{spec}: no split {split!r} (splits: {sorted(dataset)}); choose one with --split")
            dataset = dataset[split]
        return DatasetRows(dataset, f"{spec} ({split})")
    try:
        dataset = datasets.load_dataset(spec, subset, split=split)
    except Exception as error:  # datasets raises many kinds: not found, offline, no such config or split
        raise InputError(f"{spec}: not a JSON, parquet or save_to_disk input, and datasets.load_dataset could not "
                         f"load it as a dataset name ({type(error).__name__}: {error})") from error
    return DatasetRows(dataset, f"{spec} {subset or ''} ({split})")


def _file_identity(path: str) -> list:
    """What tells a rerun that a file is the one an earlier build read: path, size, modification time."""
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]

