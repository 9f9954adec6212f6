"""Turn a LLaVA-OneVision-style data YAML into a mixture file and one shard folder per dataset.

The YAML lists datasets, each an input of tools.build_shards and a sampling strategy, applied
as LLaVA-NeXT's loader does: `all` (the default), `first:N`, `end:N` or `random:N`, where N is a
count or a percentage of the input's rows (rounded up). An input is `json_path` (LLaVA-OneVision's
key: a LLaVA JSON or .jsonl) or `path` (any input of tools.build_shards: parquet, a save_to_disk
folder, a hub dataset name), with optional `schema`, `subset` and `split` as tools.build_shards'
options:

    datasets:
      - json_path: data/llava_instruct_150k.json
        sampling_strategy: all
      - json_path: data/vqav2.jsonl
        sampling_strategy: "random:25%"
      - path: data/LLaVA-OneVision-Data/sharegpt4o        # its parquet files, images inside
      - path: data/the_cauldron/ai2d
        sampling_strategy: "first:1000"

Each dataset's selected rows go through tools.build_shards (validated, skipped bad ones counted
by reason) into OUT/<name>/, named after its file or folder; OUT/mixture.yaml lists them with
repeat 1, for data.shards. Edit its repeats or give the sources weights (pipeline/data/mixture.py).
A rerun with the same arguments keeps every finished slice of every dataset.

    python -m tools.build_mixture --yaml onevision.yaml --image-root data/images --out data/onevision
"""

import argparse
import math
import os
import random
import re
from pathlib import Path

import yaml

from pipeline.data.builder import BuildSettings
from pipeline.data.sources import InputError, open_rows
from tools.build_shards import add_build_options, check_build_options, print_summary, run_build

STRATEGY = re.compile(r"^(first|end|random):(\d+(?:\.\d+)?)(%?)$")


ENTRY_KEYS = {"json_path", "path", "sampling_strategy", "schema", "subset", "split"}


def select(records: range | list, strategy: str, rng: random.Random, where: str) -> range | list:
    """The rows a sampling strategy keeps (LLaVA-NeXT's semantics; a count beyond the input keeps all)."""
    if strategy == "all":
        return records
    match = STRATEGY.match(strategy)
    if not match:
        raise SystemExit(f"error: {where}: sampling_strategy {strategy!r} is not all, first:N, end:N or random:N "
                         f"(N a count or a percentage such as 10%)")
    kind, number, percent = match.groups()
    count = math.ceil(float(number) * len(records) / 100) if percent else int(float(number))
    if kind == "first":
        return records[:count]
    if kind == "end":
        return records[-count:] if count else []
    return rng.sample(records, min(count, len(records)))


def source_names(paths: list[str]) -> list[str]:
    """A name per dataset from its file or folder name (letters, digits, _ . -), numbered when two agree."""
    names = []
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).name.removesuffix(".jsonl").removesuffix(".json")
                      .removesuffix(".parquet"))
        name, copy = base, 2
        while name in names:
            name, copy = f"{base}-{copy}", copy + 1
        names.append(name)
    return names


def build_mixture(yaml_path: str, image_root: str | None, out: str, samples_per_shard: int = 1000, workers: int = 1,
                  seed: int = 0, max_image_side: int | None = None, allow_outside_root: bool = False) -> dict:
    """Build every dataset's shards under out/ and write out/mixture.yaml; returns its contents."""
    if not os.path.isfile(yaml_path):
        raise SystemExit(f"error: {yaml_path} not found")
    datasets = (yaml.safe_load(Path(yaml_path).read_text()) or {}).get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(
            isinstance(d, dict) and len({"json_path", "path"} & set(d)) == 1 for d in datasets):
        raise SystemExit(f"error: {yaml_path}: expected `datasets:`, a list of entries each with a json_path or a path")
    specs = [str(d.get("json_path", d.get("path"))) for d in datasets]
    rng = random.Random(seed)
    sources = []
    names = source_names([d.get("subset") or spec for d, spec in zip(datasets, specs)])
    for entry, spec, name in zip(datasets, specs, names):
        strategy = str(entry.get("sampling_strategy", "all"))
        where = f"{yaml_path}, dataset {spec}"
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise SystemExit(f"error: {where}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(ENTRY_KEYS))})")
        settings = BuildSettings(spec, os.path.join(out, name), image_root, entry.get("schema"), entry.get("subset"),
                                 entry.get("split", "train"), samples_per_shard, max_image_side, allow_outside_root,
                                 source=f"{os.path.basename(os.path.normpath(spec))} ({strategy})")
        try:
            rows = range(len(open_rows(spec, settings.subset, settings.split)))
        except InputError as error:
            raise SystemExit(f"error: {where}: {error}")
        selection = select(rows, strategy, rng, where)
        print(f"\n{name}: {len(selection)} rows from {spec} ({strategy})")
        result = run_build(settings, None if strategy == "all" else list(selection), workers)
        print_summary(result)
        if result.manifest["total_samples"] == 0:
            raise SystemExit(f"error: {where}: no record kept ({strategy}); leave it out of the YAML")
        sources.append({"name": name, "shards": name, "repeat": 1})
    mixture = {"sources": sources}
    with open(os.path.join(out, "mixture.yaml"), "w") as f:
        f.write(f"# Written by tools.build_mixture from {yaml_path}; shard folders are relative to this file.\n")
        yaml.safe_dump(mixture, f, sort_keys=False)
    return mixture


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--yaml", required=True,
                        help="data YAML with `datasets:` (json_path or path, sampling_strategy, schema, subset, split)")
    parser.add_argument("--out", required=True, help="output folder: one shard folder per dataset and mixture.yaml")
    add_build_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds the random:N selections")
    args = parser.parse_args(argv)
    check_build_options(parser, args)
    mixture = build_mixture(args.yaml, args.image_root, args.out, args.samples_per_shard, args.workers, args.seed,
                            args.max_image_side, args.allow_outside_root)
    print(f"\nwrote {os.path.join(args.out, 'mixture.yaml')}: {len(mixture['sources'])} sources; train on it with "
          f"data.shards={os.path.join(args.out, 'mixture.yaml')}")


if __name__ == "__main__":
    main()
