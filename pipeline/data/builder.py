"""Building webdataset shards from an input (pipeline/data/sources.py) in slices that can run in
any number of processes or Slurm array tasks, and resume.

Slice i is the input's rows i*S .. (i+1)*S-1 (S = samples_per_shard; a selection's rows when
tools.build_mixture samples them). It becomes shard-<i>.tar, holding the rows it keeps in order,
keyed by their position in the input (so a shard is shorter by the rows it skips, and a slice
that keeps none has no shard), and slices/<i>.json, its report: counts, skips by reason with
examples, the kept ids, and the build's id. A slice's bytes depend on its rows and the build's
settings alone, never on which process or task built it or when: the tar headers are fixed
(mtime 0, user and group "data", members sorted by webdataset's TarWriter), so the shards are
byte-identical whatever the number of processes or tasks.

Each file is written under a temporary name of its process and renamed; the report after the
shard. A slice is finished when its report carries this build's id (a hash of the settings, the
input's files with sizes and modification times, and the selection) and its shard has the
reported size. A rerun with the same arguments builds only the unfinished slices; changed ones
rebuild everything, overwriting. Whoever finds every slice finished (the one process of a local
build, the last task of an array) removes what an earlier build left (shards and reports this
build doesn't have, temporary files) and writes manifest.json last, atomically; a build starting
on an out folder whose manifest has another build id removes that manifest first, so the folder
never looks complete while it is rewritten.

Images are validated at the least cost that catches truncated and undecodable files
(bench/build_shards_results.md measures it): a JPEG is decoded at 1/8 scale (libjpeg's DCT
scaling, which still reads every entropy-coded byte: a truncated or undecodable file fails as a
full decode does, in half its time), a PNG verified (every chunk's CRC up to IEND, without
inflating: truncation and changed bytes, at a fiftieth of a decode), other formats decoded. The
bytes are stored unchanged, unless --max-image-side resizes them.
"""

import glob
import hashlib
import io
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data.decode import IMAGE_EXTENSIONS
from pipeline.data.schemas import (
    ImageRef,
    SchemaError,
    Skip,
    check_schema,
    conversation_problem,
    detect_schema,
    to_llava,
)
from pipeline.data.sources import open_rows

REASONS = ["missing_image", "image_outside_root", "malformed_conversation", "image_tag_mismatch", "video",
           "system_message"]
EXAMPLES_PER_REASON = 5
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
SLICES = "slices"


@dataclass(frozen=True)
class BuildSettings:
    """What decides a build's output; schema None detects it from the columns."""

    input: str
    out_dir: str
    image_root: str | None = None
    schema: str | None = None
    subset: str | None = None
    split: str = "train"
    samples_per_shard: int = 1000
    max_image_side: int | None = None
    allow_outside_root: bool = False
    source: str | None = None  # names the input in the manifest (default: its file or folder name)


def checked_image(data: bytes, max_side: int | None = None) -> tuple[bytes, str]:
    """(bytes, PIL format) of an image that decodes (see the module docstring for how far each
    format is checked); with max_side, one longer than that comes back resized to it in its own
    format. Raises whatever PIL raises for a file it can't read."""
    with Image.open(io.BytesIO(data)) as image:
        if max_side and max(image.size) > max_side:
            return shrunk(image, max_side), image.format
        if image.format == "JPEG":
            image.draft(None, (1, 1))  # the smallest DCT scale: 1/8
            image.load()
        elif image.format == "PNG":
            image.verify()
        else:
            image.load()
        return data, image.format


def shrunk(image: Image.Image, max_side: int) -> bytes:
    """The image's bytes, resized so its longer side is max_side, encoded in its own format."""
    scale = max_side / max(image.size)
    size = tuple(max(1, round(side * scale)) for side in image.size)
    out = io.BytesIO()
    options = {"quality": 95} if image.format == "JPEG" else {}
    image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None).save(out, format=image.format, **options)
    return out.getvalue()


def outside_root(path: str) -> bool:
    """An image path that leaves the image root: absolute, or climbing out of it with '..'."""
    return os.path.isabs(path) or os.path.normpath(path).split(os.sep)[0] == ".."


def write_atomic(path: str, data: bytes) -> None:
    """Write under a name of this process, then rename: readers see the whole file or none."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class SliceBuilder:
    """A build as each of its processes holds it: the input's rows, the schema, the slices. (About 160
    lines: a slice's rows, samples, report and the manifest all read the same build settings and id.)"""

    def __init__(self, settings: BuildSettings, selection: Sequence[int] | None = None):
        self.settings = settings
        self.rows = open_rows(settings.input, settings.subset, settings.split)
        self.selection = range(len(self.rows)) if selection is None else selection
        if settings.schema:
            check_schema(settings.schema, self.rows.columns, settings.input)
        self.schema = settings.schema or detect_schema(self.rows.columns, settings.input)
        chosen = ["all", len(self.rows)] if selection is None else list(selection)
        self.build_id = hashlib.sha256(json.dumps(
            [asdict(settings) | {"out_dir": None, "schema": self.schema}, self.rows.identity(), chosen],
            sort_keys=True).encode()).hexdigest()[:16]
        size = settings.samples_per_shard
        self.num_slices = (len(self.selection) + size - 1) // size

    def shard_name(self, index: int) -> str:
        return f"shard-{index:06d}.tar"

    def report_path(self, index: int) -> str:
        return os.path.join(self.settings.out_dir, SLICES, f"{index:06d}.json")

    def slice_rows(self, index: int) -> range:
        size = self.settings.samples_per_shard
        return range(index * size, min((index + 1) * size, len(self.selection)))

    def finished(self, index: int) -> dict | None:
        """Slice index's report if this build finished it (its shard there at the reported size), else None."""
        try:
            with open(self.report_path(index)) as f:
                report = json.load(f)
        except (OSError, ValueError):
            return None
        if report.get("build_id") != self.build_id:
            return None
        shard = report["shard"]
        path = os.path.join(self.settings.out_dir, shard["name"]) if shard else None
        if shard and not (os.path.isfile(path) and os.path.getsize(path) == shard["num_bytes"]):
            return None
        return report

    def build_slice(self, index: int) -> dict:
        """Write slice index's shard and report; returns the report."""
        positions = self.slice_rows(index)
        rows = self.rows.read([self.selection[p] for p in positions])
        report = {"build_id": self.build_id, "slice": index, "rows": len(positions), "shard": None, "ids": [],
                  "skipped": {}, "skipped_examples": {}}
        name = self.shard_name(index)
        path = os.path.join(self.settings.out_dir, name)
        tmp, file, writer = f"{path}.{os.getpid()}.tmp", None, None
        for position, row in zip(positions, rows):
            row_index = self.selection[position]
            try:
                sample, record_id = self.sample(row, row_index, position)
            except Skip as skip:
                record_id = row.get("id") if isinstance(row, dict) else None
                example = record_id if isinstance(record_id, (str, int)) else f"row-{row_index}"
                report["skipped"][skip.reason] = report["skipped"].get(skip.reason, 0) + 1
                examples = report["skipped_examples"].setdefault(skip.reason, [])
                if len(examples) < EXAMPLES_PER_REASON:
                    examples.append(example)
                continue
            if writer is None:
                file = open(tmp, "wb")
                # Fixed mtime/user/group make the tar bytes a function of the data alone.
                writer = wds.TarWriter(file, mtime=0, user="data", group="data")
            writer.write(sample)
            report["ids"].append(record_id)
        if writer is not None:
            writer.close()
            file.close()
            os.replace(tmp, path)
            report["shard"] = {"name": name, "num_samples": len(report["ids"]), "num_bytes": os.path.getsize(path)}
        write_atomic(self.report_path(index), json.dumps(report, sort_keys=True).encode())
        return report

    def sample(self, row: dict, row_index: int, position: int) -> tuple[dict, str | int]:
        """(the webdataset sample, the record's id) of a row; Skip when it can't be one."""
        record, images = to_llava(row, row_index, self.schema)
        problem = conversation_problem(record, len(images))
        if problem:
            raise Skip(problem)
        single = isinstance(record.get("image"), str)
        names, sample = [], {"__key__": f"{position:09d}"}  # positions: ids repeat, and may hold dots or slashes
        for i, image in enumerate(images):
            data, image_format = self.image_bytes(image, row_index)
            extension = os.path.splitext(image.name or "")[1].lstrip(".").lower()
            if extension not in IMAGE_EXTENSIONS:
                extension = FORMAT_EXTENSIONS.get(image_format, "img")
            names.append(image.name or f"embedded-{i}.{extension}")
            sample[extension if single else f"{i}.{extension}"] = data
        if images:
            record["image"] = names[0] if single else names
        sample["json"] = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
        return sample, record["id"]

    def image_bytes(self, image: ImageRef, row_index: int) -> tuple[bytes, str]:
        """An image's checked bytes and format, read from the image root when it is a path."""
        data = image.data
        if data is None:
            if outside_root(image.name) and not self.settings.allow_outside_root:
                raise Skip("image_outside_root")
            if self.settings.image_root is None:
                raise SchemaError(f"row {row_index}: image {image.name!r} is a path; give the folder it is "
                                  f"relative to with --image-root")
            try:
                with open(os.path.join(self.settings.image_root, image.name), "rb") as f:
                    data = f.read()
            except OSError:
                raise Skip("missing_image")
        try:
            return checked_image(data, self.settings.max_image_side)
        except Exception:  # PIL raises many kinds for a file it can't read; all mean the same here
            raise Skip("missing_image")

    def manifest(self, reports: list[dict]) -> dict:
        """manifest.json's contents from every slice's report, in slice order."""
        skipped = {reason: 0 for reason in REASONS}
        examples = {reason: [] for reason in REASONS}
        seen, repeated = set(), 0
        for report in reports:
            for reason, count in report["skipped"].items():
                skipped[reason] += count
                examples[reason] += report["skipped_examples"][reason][:EXAMPLES_PER_REASON - len(examples[reason])]
            for record_id in report["ids"]:
                repeated += record_id in seen
                seen.add(record_id)
        shards = [report["shard"] for report in reports if report["shard"]]
        settings = self.settings
        return {
            "source": settings.source or os.path.basename(os.path.normpath(settings.input)),
            "schema": self.schema,
            "build_id": self.build_id,
            "samples_per_shard": settings.samples_per_shard,
            "max_image_side": settings.max_image_side,
            "shards": shards,
            "total_samples": sum(s["num_samples"] for s in shards),
            "total_bytes": sum(s["num_bytes"] for s in shards),
            "total_records": len(self.selection),
            "repeated_ids": repeated,
            "skipped": skipped,
            "skipped_examples": {reason: ids for reason, ids in examples.items() if ids},
        }

    def finish(self, reports: list[dict]) -> dict:
        """Remove what other builds left in the out folder, then write manifest.json; returns it."""
        out = self.settings.out_dir
        manifest = self.manifest(reports)
        keep = {s["name"] for s in manifest["shards"]}
        leftovers = [p for p in glob.glob(os.path.join(out, "shard-*.tar")) if os.path.basename(p) not in keep]
        leftovers += [p for p in glob.glob(os.path.join(out, SLICES, "*.json"))
                      if int(os.path.basename(p).removesuffix(".json")) >= self.num_slices]
        leftovers += glob.glob(os.path.join(out, "shard-*.tmp")) + glob.glob(os.path.join(out, SLICES, "*.tmp"))
        for path in leftovers:
            try:
                os.remove(path)
            except FileNotFoundError:  # another task finishing at the same moment removed it
                pass
        write_atomic(
            os.path.join(out, "manifest.json"), (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        )
        return manifest


_worker: SliceBuilder | None = None  # each pool process's own


def _start_worker(settings: BuildSettings, selection: Sequence[int] | None) -> None:
    global _worker
    _worker = SliceBuilder(settings, selection)


def _build_in_worker(index: int) -> dict:
    return _worker.build_slice(index)


@dataclass
class BuildResult:
    """A build's (or an array task's) outcome: the manifest once every slice is finished, else None."""

    manifest: dict | None
    slices_built: int
    slices_kept: int
    rows_built: int
    seconds: float
    slices_left: int


def build(settings: BuildSettings, selection: Sequence[int] | None = None, workers: int = 1,
          task_index: int = 0, task_count: int = 1) -> BuildResult:
    """Build the unfinished slices of this task's share (slices i with i % task_count ==
    task_index) in `workers` processes, then the manifest if every slice is finished."""
    builder = SliceBuilder(settings, selection)
    os.makedirs(os.path.join(settings.out_dir, SLICES), exist_ok=True)
    manifest_path = os.path.join(settings.out_dir, "manifest.json")
    try:
        with open(manifest_path) as f:
            stale = json.load(f).get("build_id") != builder.build_id
    except (OSError, ValueError):
        stale = False
    if stale:
        os.remove(manifest_path)
    mine = range(task_index, builder.num_slices, task_count)
    todo = [i for i in mine if builder.finished(i) is None]
    rows = sum(len(builder.slice_rows(i)) for i in todo)
    start = time.perf_counter()
    with tqdm(total=rows, desc=f"building {len(todo)} slices", unit="rows") as progress:
        if workers == 1 or len(todo) <= 1:
            for index in todo:
                progress.update(builder.build_slice(index)["rows"])
        else:
            with multiprocessing.Pool(min(workers, len(todo)), _start_worker, (settings, selection)) as pool:
                for report in pool.imap_unordered(_build_in_worker, todo):
                    progress.update(report["rows"])
    seconds = time.perf_counter() - start
    reports = [builder.finished(i) for i in range(builder.num_slices)]
    left = sum(report is None for report in reports)
    manifest = builder.finish(reports) if not left else None
    return BuildResult(manifest, len(todo), len(mine) - len(todo), rows, seconds, left)
