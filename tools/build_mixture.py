"""Turn a LLaVA-OneVision-style data YAML into a mixture file and one shard folder per dataset.

The YAML lists datasets, each a LLaVA conversation JSON (or .jsonl) and a sampling strategy,
applied as LLaVA-NeXT's loader does: `all` (the default), `first:N`, `end:N` or `random:N`,
where N is a count or a percentage of the file's records (rounded up):

    datasets:
      - json_path: data/llava_instruct_150k.json
        sampling_strategy: all
      - json_path: data/vqav2.jsonl
        sampling_strategy: "random:25%"

Each dataset's selected records go through tools.build_shards (validated, skipped bad ones
counted by reason) into OUT/<name>/, named after its JSON file; OUT/mixture.yaml lists them with
repeat 1, for data.shards. Edit its repeats or give the sources weights (pipeline/data/mixture.py).

    python -m tools.build_mixture --yaml onevision.yaml --image-root data/images --out data/onevision
"""

import argparse
import math
import os
import random
import re
from pathlib import Path

import yaml

from tools.build_shards import build_records, load_records, print_summary

STRATEGY = re.compile(r"^(first|end|random):(\d+(?:\.\d+)?)(%?)$")


def select(records: list, strategy: str, rng: random.Random, where: str) -> list:
    """The records a sampling strategy keeps (LLaVA-NeXT's semantics; a count beyond the file keeps all)."""
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


def source_names(json_paths: list[str]) -> list[str]:
    """A name per dataset from its file name (letters, digits, _ . -), numbered when two agree."""
    names = []
    for path in json_paths:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).name.removesuffix(".jsonl").removesuffix(".json"))
        name, copy = base, 2
        while name in names:
            name, copy = f"{base}-{copy}", copy + 1
        names.append(name)
    return names


def build_mixture(yaml_path: str, image_root: str, out: str, samples_per_shard: int = 1000, workers: int = 1,
                  seed: int = 0) -> dict:
    """Build every dataset's shards under out/ and write out/mixture.yaml; returns its contents."""
    if not os.path.isfile(yaml_path):
        raise SystemExit(f"error: {yaml_path} not found")
    datasets = (yaml.safe_load(Path(yaml_path).read_text()) or {}).get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) and "json_path" in d
                                                                   for d in datasets):
        raise SystemExit(f"error: {yaml_path}: expected `datasets:`, a list of entries with a json_path")
    rng = random.Random(seed)
    sources = []
    for entry, name in zip(datasets, source_names([d["json_path"] for d in datasets])):
        strategy = str(entry.get("sampling_strategy", "all"))
        where = f"{yaml_path}, dataset {entry['json_path']}"
        records = select(load_records(entry["json_path"]), strategy, rng, where)
        print(f"\n{name}: {len(records)} records from {entry['json_path']} ({strategy})")
        manifest = build_records(records, f"{os.path.basename(entry['json_path'])} ({strategy})", image_root,
                                 os.path.join(out, name), samples_per_shard, workers)
        print_summary(manifest)
        if manifest["total_samples"] == 0:
            raise SystemExit(f"error: {where}: no record kept ({strategy}); leave it out of the YAML")
        sources.append({"name": name, "shards": name, "repeat": 1})
    mixture = {"sources": sources}
    with open(os.path.join(out, "mixture.yaml"), "w") as f:
        f.write(f"# Written by tools.build_mixture from {yaml_path}; shard folders are relative to this file.\n")
        yaml.safe_dump(mixture, f, sort_keys=False)
    return mixture


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--yaml", required=True, help="data YAML with `datasets:` (json_path, sampling_strategy)")
    parser.add_argument("--image-root", required=True, help="folder the records' 'image' paths are relative to")
    parser.add_argument("--out", required=True, help="output folder: one shard folder per dataset and mixture.yaml")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="processes validating images")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random:N selections")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1 or args.workers < 1:
        parser.error("--samples-per-shard and --workers must be >= 1")
    mixture = build_mixture(args.yaml, args.image_root, args.out, args.samples_per_shard, args.workers, args.seed)
    print(f"\nwrote {os.path.join(args.out, 'mixture.yaml')}: {len(mixture['sources'])} sources; train on it with "
          f"data.shards={os.path.join(args.out, 'mixture.yaml')}")


if __name__ == "__main__":
    main()
