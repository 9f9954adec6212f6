"""Turn LLaVA conversation JSON (or JSON Lines) plus an image folder into webdataset shards.

Each sample is the original image bytes (key.png, key.jpg, ...) and the record (key.json). A
record's "image" is one path or, as in LLaVA-OneVision's multi-image data, a list of paths, one
per <image> tag in the order of the tags; image i of a list is stored as key.<i>.<ext>.
Bad records are skipped, counted by reason, and the build goes on:
  missing_image           an image file missing, unreadable or undecodable
  malformed_conversation  not a dict, no id, conversations not a non-empty list of
                          human/gpt turns alternating from human, or an empty value; an
                          "image" that is neither a path nor a non-empty list of paths
  image_tag_mismatch      number of <image> tags != number of images (1 for a path, the
                          list's length for a list, else 0)
Records that repeat an earlier record's id are kept: LLaVA-1.5's mix reuses COCO image ids
across its subsets (LLaVA-Instruct, VQAv2, OK-VQA, A-OKVQA, RefCOCO), each with another
conversation. Shard keys are positions, not ids; the manifest counts repeated ids as information.
OUT/manifest.json lists the shards with sample counts and sizes, the skipped counts and the
number of kept records whose id an earlier one already had.
--max-image-side S stores images whose longer side exceeds S resized to S on that side (Pillow's
bicubic with antialiasing, aspect kept, same format; JPEG at quality 95), and records S in the
manifest. It shrinks shards and the loader's decode of large photographs; the cost is that the
model trains on pixels one resampling away from what a user passes at inference. Pick S at least
the tower's side times the largest tile grid side you train, so tiles are not upsampled.
Same input, byte-identical shards and manifest. Every file is written under a temporary
name and renamed, and the manifest last, so an interrupted build never looks complete.

    python -m tools.build_shards --json data/synth/data.json --image-root data/synth --out data/synth_shards
"""

import argparse
import concurrent.futures
import functools
import glob
import io
import json
import os

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.chat import IMAGE_TOKEN

REASONS = ["missing_image", "malformed_conversation", "image_tag_mismatch"]
EXAMPLES_PER_REASON = 5
CHUNK = 512  # records validated per batch of worker jobs; bounds the image bytes held in memory
TMP_SUFFIX = ".tmp"


def load_records(path):
    """A list of records from a JSON list or a JSON Lines file (a bad line becomes None)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found")
    with open(path) as f:
        if path.endswith(".jsonl"):
            records = []
            for line in f:
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        records.append(None)
            return records
        try:
            records = json.load(f)
        except json.JSONDecodeError as error:
            raise SystemExit(f"error: {path} is not valid JSON ({error}); JSON Lines files must end in .jsonl")
    if not isinstance(records, list):
        raise SystemExit(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def conversation_problem(record):
    """The skip reason for a record's text, or None if it is fine (images are checked apart)."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return "malformed_conversation"
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") != ("human", "gpt")[i % 2]:
            return "malformed_conversation"
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            return "malformed_conversation"
    images = record.get("image", [])
    if isinstance(images, list):
        if "image" in record and (not images or not all(isinstance(path, str) and path for path in images)):
            return "malformed_conversation"
    elif not isinstance(images, str):
        return "malformed_conversation"
    tags = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)
    if tags != len(image_paths(record)):
        return "image_tag_mismatch"
    return None


def image_paths(record):
    """The record's image paths, in order (a validated record)."""
    images = record.get("image", [])
    return [images] if isinstance(images, str) else images


def image_member(record, index):
    """The tar extension of the record's image `index`: its file's own for a single path
    (key.jpg), numbered for a list (key.0.jpg, key.1.png) as pipeline/data/decode.py reads them."""
    path = image_paths(record)[index]
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "img"
    return ext if isinstance(record["image"], str) else f"{index}.{ext}"


def read_image(path, max_side=None):
    """(bytes, None) if the file decodes fully, else (None, 'missing_image'); with max_side, an
    image longer than that on its longer side comes back resized to it, in its own format."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # full decode: truncated files pass Image.open but fail here
            if max_side and max(image.size) > max_side:
                data = shrunk(image, max_side)
        return data, None
    except Exception:  # any unreadable or undecodable file is the same skip reason
        return None, "missing_image"


def shrunk(image, max_side):
    """The image's bytes, resized so its longer side is max_side, encoded in its own format."""
    scale = max_side / max(image.size)
    size = tuple(max(1, round(side * scale)) for side in image.size)
    out = io.BytesIO()
    options = {"quality": 95} if image.format == "JPEG" else {}
    image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None).save(out, format=image.format, **options)
    return out.getvalue()


class ShardWriter:
    """Writes shard-NNNNNN.tar files of fixed size, each under a temporary name until complete."""

    def __init__(self, out_dir, samples_per_shard):
        self.out_dir, self.samples_per_shard = out_dir, samples_per_shard
        self.shards, self.writer, self.file, self.total = [], None, None, 0

    def write(self, sample):
        if self.writer is None:
            name = f"shard-{len(self.shards):06d}.tar"
            self.file = open(os.path.join(self.out_dir, name + TMP_SUFFIX), "wb")
            # Fixed mtime/user/group make the tar bytes a function of the data alone.
            self.writer = wds.TarWriter(self.file, mtime=0, user="data", group="data")
            self.shards.append({"name": name, "num_samples": 0, "num_bytes": 0})
        self.writer.write(sample)
        self.shards[-1]["num_samples"] += 1
        self.total += 1
        if self.shards[-1]["num_samples"] == self.samples_per_shard:
            self.close()

    def close(self):
        if self.writer is None:
            return
        self.writer.close()
        self.file.close()
        path = os.path.join(self.out_dir, self.shards[-1]["name"])
        os.replace(path + TMP_SUFFIX, path)
        self.shards[-1]["num_bytes"] = os.path.getsize(path)
        self.writer = self.file = None


def write_json_atomic(path, obj):
    with open(path + TMP_SUFFIX, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + TMP_SUFFIX, path)


def clean_out_dir(out_dir):
    """Remove what an earlier (perhaps interrupted) build left: temp files, shards, manifest."""
    os.makedirs(out_dir, exist_ok=True)
    for path in glob.glob(os.path.join(out_dir, "*" + TMP_SUFFIX)) + glob.glob(os.path.join(out_dir, "shard-*.tar")):
        os.remove(path)
    manifest = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest):
        os.remove(manifest)


def build(json_path, image_root, out_dir, samples_per_shard=1000, workers=1, max_image_side=None):
    """Build the shards and manifest from a JSON or JSON Lines file; returns the manifest dict."""
    return build_records(load_records(json_path), os.path.basename(json_path), image_root, out_dir, samples_per_shard,
                         workers, max_image_side)


def build_records(records, source, image_root, out_dir, samples_per_shard=1000, workers=1, max_image_side=None):
    """Build the shards and manifest from a list of records; `source` names them in the manifest."""
    clean_out_dir(out_dir)
    skipped = {reason: 0 for reason in REASONS}
    examples = {reason: [] for reason in REASONS}
    seen_ids, repeated_ids = set(), 0
    writer = ShardWriter(out_dir, samples_per_shard)

    def skip(reason, record_id):
        skipped[reason] += 1
        if len(examples[reason]) < EXAMPLES_PER_REASON:
            examples[reason].append(record_id)

    pool = concurrent.futures.ProcessPoolExecutor(workers) if workers > 1 else None
    progress = tqdm(total=len(records), desc="building shards", unit="rec")
    try:
        for start in range(0, len(records), CHUNK):
            # Text checks first, then images in parallel.
            candidates = []
            for index, record in enumerate(records[start:start + CHUNK], start):
                if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)):
                    skip("malformed_conversation", f"<record {index}>")
                elif problem := conversation_problem(record):
                    skip(problem, record["id"])
                else:
                    candidates.append(record)
            paths = [os.path.join(image_root, path) for r in candidates for path in image_paths(r)]
            read = functools.partial(read_image, max_side=max_image_side)
            images = iter(pool.map(read, paths, chunksize=16) if pool else map(read, paths))
            for record in candidates:
                sample = {"json": json.dumps(record, sort_keys=True, ensure_ascii=False).encode()}
                read = [next(images) for _ in image_paths(record)]
                if any(problem for _, problem in read):
                    skip("missing_image", record["id"])
                    continue
                for index, (data, _) in enumerate(read):
                    sample[image_member(record, index)] = data
                # Keys are running numbers: ids repeat, and may hold dots or slashes that tar keys can't.
                sample["__key__"] = f"{writer.total:09d}"
                writer.write(sample)
                repeated_ids += record["id"] in seen_ids
                seen_ids.add(record["id"])
            progress.update(min(CHUNK, len(records) - start))
        writer.close()
    finally:
        progress.close()
        if pool:
            pool.shutdown()

    manifest = {
        "source": source,
        "samples_per_shard": samples_per_shard,
        "max_image_side": max_image_side,
        "shards": writer.shards,
        "total_samples": writer.total,
        "total_bytes": sum(s["num_bytes"] for s in writer.shards),
        "total_records": len(records),
        "repeated_ids": repeated_ids,
        "skipped": skipped,
        "skipped_examples": {r: ids for r, ids in examples.items() if ids},
    }
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def add_build_options(parser):
    """The shard-writing options tools.build_shards and tools.build_mixture share."""
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="processes validating images")
    parser.add_argument("--max-image-side", type=int, default=None,
                        help="store images longer than this (px, longer side) resized to it; "
                             "recorded in the manifest (default: images as they are)")


def check_build_options(parser, args):
    if args.samples_per_shard < 1 or args.workers < 1 or (args.max_image_side is not None and args.max_image_side < 1):
        parser.error("--samples-per-shard, --workers and --max-image-side must be >= 1")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="LLaVA conversation JSON list, or .jsonl")
    parser.add_argument("--image-root", required=True, help="folder the records' 'image' paths (one or a list) are relative to")
    parser.add_argument("--out", required=True, help="output folder for shard-*.tar and manifest.json")
    add_build_options(parser)
    args = parser.parse_args(argv)
    check_build_options(parser, args)
    print_summary(build(args.json, args.image_root, args.out, args.samples_per_shard, args.workers,
                        args.max_image_side))


def print_summary(manifest):
    print(f"kept {manifest['total_samples']} of {manifest['total_records']} records "
          f"in {len(manifest['shards'])} shards ({manifest['total_bytes']} bytes)")
    print(f"repeated ids: {manifest['repeated_ids']} kept records share their id with an earlier one "
          f"(kept: LLaVA's mix gives one image several conversations)")
    for reason, count in manifest["skipped"].items():
        print(f"skipped {reason}: {count}" + (f" (e.g. {manifest['skipped_examples'][reason]})" if count else ""))


if __name__ == "__main__":
    main()
