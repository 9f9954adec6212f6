"""What to train on: a mixture of sources, each a shard folder with a name and a share.

data.shards names a mixture file, or a single shard folder or brace pattern (a mixture of one
source, repeat 1). A mixture file:

    sources:
      - name: llava_instruct        # letters, digits, _ . - (it names the source in metrics)
        shards: llava_instruct      # a folder from tools.build_shards, relative to this file
        repeat: 1                   # exact epochs: every sample this many times per epoch
      - name: vqav2
        shards: /data/vqav2_shards
        repeat: 0.5                 # a fraction: a seeded half of it each epoch, the other half the next

Each source takes exactly one of `repeat` (all sources then: LLaVA-1.5's and Megatron-Energon's
blend_epochized) or `weight` (all sources then: proportional sampling, endless, as Energon's
blend and Streaming's proportion). pipeline/data/plan.py turns a mixture into epochs.
"""

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import yaml

from pipeline.data.shards import count_samples

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
MIXTURE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Source:
    """One shard folder (or brace pattern) of a mixture; urls and sizes list its non-empty shards."""

    name: str
    shards: str
    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    repeat: float | None = None
    weight: float | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class Mixture:
    sources: tuple[Source, ...]

    @property
    def mode(self) -> str:
        return "repeat" if self.sources[0].repeat is not None else "weight"

    def takes(self) -> list[int]:
        """Samples each source gives one epoch. repeat: round(repeat x its size). weight: its share of
        a virtual epoch as large as all sources together (at least one sample)."""
        if self.mode == "repeat":
            return [round(s.repeat * s.num_samples) for s in self.sources]
        total, weights = sum(s.num_samples for s in self.sources), sum(s.weight for s in self.sources)
        return [max(1, round(total * s.weight / weights)) for s in self.sources]

    def epoch_length(self) -> int:
        return sum(self.takes())

    def manifest(self, seed: int) -> dict:
        """What a checkpoint and a model card record of the data: sources, sizes, shares, epoch length, seed."""
        return {"mode": self.mode, "epoch_samples": self.epoch_length(), "seed": seed,
                "sources": [{"name": s.name, "shards": s.shards, "num_shards": len(s.urls), "samples": s.num_samples,
                             self.mode: getattr(s, self.mode), "samples_per_epoch": take}
                            for s, take in zip(self.sources, self.takes())]}

    def fingerprint(self) -> list:
        """What must not change for a saved position in the data to keep its meaning. Shard names
        only, not their folders: the data may move."""
        return [
            [s.name, [os.path.basename(u) for u in s.urls], list(s.sizes), s.repeat, s.weight] for s in self.sources
        ]


def resolve_source(spec: str, where: str = "data.shards") -> tuple[list[str], list[int]]:
    """(paths, sample counts) of the non-empty shards of a folder with manifest.json or a brace
    pattern (counted from the tar headers); errors name `where` and what is missing."""
    if not spec:
        raise ValueError(f"{where} not set: give a mixture file, a folder with manifest.json or a brace pattern")
    if os.path.isdir(spec):
        manifest_path = os.path.join(spec, "manifest.json")
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(
                f"{where}: {spec} is a folder without manifest.json (build it with tools.build_shards)"
            )
        with open(manifest_path) as f:
            shards = [(os.path.join(spec, s["name"]), s["num_samples"]) for s in json.load(f)["shards"]]
    elif os.path.isfile(spec) or "{" in spec:
        paths = list(braceexpand.braceexpand(spec))
        shards = [(p, None) for p in paths]
    else:
        raise FileNotFoundError(f"{where}: {spec} not found")
    missing = [p for p, _ in shards if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{where}: shard {missing[0]} not found ({len(missing)} missing of {len(shards)})")
    shards = [(p, count_samples(p) if n is None else n) for p, n in shards]
    for path in [p for p, n in shards if n == 0]:
        log.warning("%s: shard %s holds no readable sample; left out", where, path)
    shards = [(p, n) for p, n in shards if n > 0]
    if not shards:
        raise ValueError(f"{where}: no shards with samples in {spec}")
    urls, sizes = zip(*shards)
    return list(urls), list(sizes)


def load_mixture(shards: str) -> Mixture:
    """The mixture data.shards names: a mixture file, or one source (a folder or brace pattern)."""
    if not shards.endswith(MIXTURE_SUFFIXES):
        urls, sizes = resolve_source(shards)
        name = Path(shards).name if os.path.isdir(shards) else Path(shards).parent.name
        return Mixture((Source(name, shards, tuple(urls), tuple(sizes), repeat=1.0),))
    path = Path(shards)
    if not path.is_file():
        raise FileNotFoundError(f"data.shards: mixture file {path} not found")
    entries = (yaml.safe_load(path.read_text()) or {}).get("sources")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"mixture {path}: expected a non-empty list under `sources:`")
    sources = [_source(entry, i, path) for i, entry in enumerate(entries)]
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"mixture {path}: source name {repeated[0]!r} is used more than once")
    modes = {s.name: "repeat" if s.repeat is not None else "weight" for s in sources}
    if len(set(modes.values())) > 1:
        weighted = [n for n, m in modes.items() if m == "weight"]
        raise ValueError(f"mixture {path}: source {weighted[0]!r} has a weight while others have a repeat count; "
                         f"give every source a repeat (exact epochs) or every source a weight (proportional)")
    return Mixture(tuple(sources))


def _source(entry: object, index: int, path: Path) -> Source:
    name = entry.get("name") if isinstance(entry, dict) else None
    label = f"mixture {path}, source {name!r}" if name else f"mixture {path}, source #{index + 1}"
    if not isinstance(entry, dict) or not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{label}: needs a `name` of letters, digits, _ . or - (it names the source in metrics)")
    unknown = sorted(set(entry) - {"name", "shards", "repeat", "weight"})
    if unknown:
        raise ValueError(f"{label}: unknown key {unknown[0]!r} (keys: name, shards, repeat or weight)")
    if ("repeat" in entry) == ("weight" in entry):
        raise ValueError(f"{label}: give exactly one of `repeat` (exact epochs) and `weight` (proportional sampling)")
    key = "repeat" if "repeat" in entry else "weight"
    share = entry[key]
    if isinstance(share, bool) or not isinstance(share, (int, float)) or share <= 0:
        raise ValueError(f"{label}: {key} must be a number > 0, got {share!r}")
    if not isinstance(entry.get("shards"), str):
        raise ValueError(f"{label}: `shards` must be the path of its shard folder")
    folder = entry["shards"] if os.path.isabs(entry["shards"]) else str(path.parent / entry["shards"])
    urls, sizes = resolve_source(folder, where=label)
    return Source(name, folder, tuple(urls), tuple(sizes), **{key: float(share)})
