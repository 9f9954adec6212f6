"""Turn a conversation data set, as it is published, into webdataset shards.

--input is LLaVA JSON or JSON Lines; parquet (a file, a folder of them, or a glob); a `datasets`
save_to_disk folder; or a Hugging Face hub dataset name (read through datasets: from its local
cache when offline; --subset, --split). Images are bytes in the rows or paths relative to
--image-root, one or a list per row. The conversation schema is detected from the columns
(--schema to choose): llava (`conversations`, LLaVA-OneVision-Data), cauldron (`texts` and
`images`: The Cauldron, FineVision) or messages (`messages`, with string or typed content), as
pipeline/data/schemas.py describes. Data that no schema explains stops the build with an error
naming the row.

Each sample is the record in LLaVA form (key.json: conversations, "image" names, the row's
other columns) and its image bytes unchanged (key.<ext> for one image, key.<i>.<ext> for several).
Bad rows are skipped, counted by reason, with the first ids of each in the manifest:
  missing_image           an image file missing or unreadable, or its bytes not an image
                          (truncated or undecodable: see the validation below)
  image_outside_root      an image path that is absolute or leaves --image-root with '..'
                          (kept with --allow-outside-root)
  malformed_conversation  turns not human/gpt (user/assistant) alternating from human with
                          non-empty text; an image that is neither a path nor bytes; a bad id
  image_tag_mismatch      <image> tags (or image parts) that don't match the row's images
  video                   a video row: skipped until the project trains on video
  system_message          a system turn, which LLaVA records can't hold
Records that repeat an earlier record's id are kept (LLaVA-1.5's mix gives one COCO image
several conversations); the manifest counts them.

The build is cut into slices of --samples-per-shard input rows, one shard each
(shard-<slice>.tar, shorter by its skipped rows), built by --workers processes, or by the tasks
of a Slurm array (slurm/build_shards.sh passes --task-index and --task-count). The output is
byte-identical whatever the number of processes or tasks. Run again with the same arguments, an
interrupted build keeps every finished slice and builds the rest; manifest.json (shards, counts,
skips, repeated ids) is written last, atomically, by whoever finishes the last slice.
Validation reads a JPEG at 1/8 scale and checks a PNG's chunk checksums: truncated and
undecodable files are caught without decoding every pixel (pipeline/data/builder.py).
--max-image-side S stores images longer than S pixels resized to S (Pillow's bicubic, same
format, JPEG quality 95) and records S in the manifest: smaller shards and less decoding in
every epoch, at the cost of training on pixels one resampling away from what users pass.

    python -m tools.build_shards --input data/synth/data.json --image-root data/synth --out data/synth_shards
    python -m tools.build_shards --input data/onevision/sharegpt4o --out data/shards/sharegpt4o --workers 16
"""

import argparse
import sys

from pipeline.data import builder
from pipeline.data.builder import BuildResult, BuildSettings
from pipeline.data.schemas import SCHEMAS, SchemaError
from pipeline.data.sources import InputError


def add_build_options(parser: argparse.ArgumentParser) -> None:
    """The shard-writing options tools.build_shards and tools.build_mixture share."""
    parser.add_argument("--image-root", default=None,
                        help="folder the rows' image paths are relative to (not needed when the images are bytes)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="keep rows whose image paths are absolute or leave --image-root with '..'")
    parser.add_argument("--samples-per-shard", type=int, default=1000,
                        help="input rows per slice and shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="processes building slices (default 1)")
    parser.add_argument("--max-image-side", type=int, default=None,
                        help="store images longer than this (px, longer side) resized to it; "
                             "recorded in the manifest (default: images as they are)")


def check_build_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.samples_per_shard < 1 or args.workers < 1 or (args.max_image_side is not None and args.max_image_side < 1):
        parser.error("--samples-per-shard, --workers and --max-image-side must be >= 1")


def run_build(settings: BuildSettings, selection=None, workers: int = 1, task_index: int = 0,
              task_count: int = 1) -> BuildResult:
    """build() with its input and schema errors turned into a one-line exit naming them."""
    try:
        return builder.build(settings, selection, workers, task_index, task_count)
    except (InputError, SchemaError) as error:
        raise SystemExit(f"error: {error}")


def build(input: str, image_root: str | None, out_dir: str, samples_per_shard: int = 1000, workers: int = 1,
          max_image_side: int | None = None, **options) -> dict:
    """A whole build in this process (and `workers` - 1 more), as the command without --task-*;
    options are BuildSettings' others (schema, allow_outside_root, ...). Returns the manifest."""
    settings = BuildSettings(input, out_dir, image_root, samples_per_shard=samples_per_shard,
                             max_image_side=max_image_side, **options)
    return run_build(settings, workers=workers).manifest


def print_summary(result: BuildResult) -> None:
    rate = f"{result.rows_built / result.seconds:.0f} rows/s" if result.seconds > 0 and result.rows_built else "-"
    print(f"built {result.slices_built} slices ({result.rows_built} rows, {rate}); "
          f"{result.slices_kept} finished by an earlier run kept")
    manifest = result.manifest
    if manifest is None:
        print(f"{result.slices_left} slices are left to other tasks; the last to finish writes manifest.json")
        return
    print(f"kept {manifest['total_samples']} of {manifest['total_records']} rows ({manifest['schema']} schema) "
          f"in {len(manifest['shards'])} shards ({manifest['total_bytes']} bytes)")
    print(f"repeated ids: {manifest['repeated_ids']} kept records share their id with an earlier one "
          f"(kept: LLaVA's mix gives one image several conversations)")
    for reason, count in manifest["skipped"].items():
        print(f"skipped {reason}: {count}" + (f" (e.g. {manifest['skipped_examples'][reason]})" if count else ""))


def main(argv: list[str] | None = None) -> BuildResult:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="LLaVA .json/.jsonl, parquet file/folder/glob, save_to_disk folder or hub dataset name")
    parser.add_argument("--out", required=True, help="output folder for shard-*.tar, slices/ and manifest.json")
    parser.add_argument("--schema", choices=sorted(SCHEMAS), default=None,
                        help="conversation schema (default: detected from the columns)")
    parser.add_argument("--subset", default=None, help="a hub dataset's subset (configuration) name")
    parser.add_argument(
        "--split", default="train", help="the split of a hub dataset or saved DatasetDict (default train)"
    )
    add_build_options(parser)
    parser.add_argument("--task-index", type=int, default=0,
                        help="this task's number in a Slurm array of --task-count tasks (slurm/build_shards.sh)")
    parser.add_argument(
        "--task-count", type=int, default=1, help="tasks sharing the build; each takes every n-th slice"
    )
    args = parser.parse_args(argv)
    check_build_options(parser, args)
    if not 0 <= args.task_index < args.task_count:
        parser.error("--task-index must be in 0 .. --task-count - 1")
    settings = BuildSettings(args.input, args.out, args.image_root, args.schema, args.subset, args.split,
                             args.samples_per_shard, args.max_image_side, args.allow_outside_root)
    result = run_build(settings, workers=args.workers, task_index=args.task_index, task_count=args.task_count)
    print_summary(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
