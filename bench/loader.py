"""Benchmark the data pipeline on synthetic data (CPU only; results go in bench/loader_results.md).

1. samples/s of the streaming loader (shards -> decode + tokenize in DataLoader workers) with
   1 and 2 workers, next to a LLaVA-style map dataset (JSON + image folder, same decode and
   tokenization) read through a DataLoader with the same worker counts;
2. padding fraction of the packer at N in {64, 144, 256} with default DataConfig settings, on
   the synthetic data and on a LLaVA-like length distribution (text lengths lognormal around
   ~120 tokens, 2% long ones of 600-1500 tokens, 10% text-only).

    python -m bench.loader --n 3000
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import AutoImageProcessor

from pipeline.data import DataConfig, SampleStream, TrainBatches, resolve_shards, tokenize_record
from pipeline.tokens import load_tokenizer
from tools import build_shards, make_synthetic, make_tiny_models


class LlavaMapDataset(Dataset):
    """The usual LLaVA loader: the whole JSON in memory, one image file opened per sample."""

    def __init__(self, json_path, image_root, tokenizer, image_processor):
        self.records = json.loads(Path(json_path).read_text())
        self.image_root, self.tokenizer, self.image_processor = Path(image_root), tokenizer, image_processor

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        pixel_values = None
        if "image" in record:
            with Image.open(self.image_root / record["image"]) as image:
                pixel_values = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        input_ids, labels = tokenize_record(record, self.tokenizer, int("image" in record), key=record["id"])
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


def samples_per_second(loader, expected):
    start, count = time.perf_counter(), 0
    for item in loader:
        count += item.get("kind", "sample") == "sample"
    if count != expected:
        raise RuntimeError(f"read {count} samples, expected {expected}")
    return count / (time.perf_counter() - start)


def padding_fraction(shards, models, n, batches):
    loader = TrainBatches(DataConfig(shards=str(shards)), *models)
    out = [loader.next_batch(n) for _ in range(batches)]
    stats = out[-1]["stats"]
    pad = sum(b["stats"]["pad_tokens"] for b in out) / sum(b["input_ids"].numel() for b in out)
    per_batch = statistics.mean(b["stats"]["num_samples"] for b in out)
    return pad, per_batch, stats["total_truncated"], stats["total_dropped"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="synthetic records to stream")
    parser.add_argument("--batches", type=int, default=150, help="packed batches per padding measurement")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # like a dataloader worker; keeps the two cores for the workers

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        make_tiny_models.main([str(work / "models")])
        models = (load_tokenizer(work / "models" / "qwen2"),
                  AutoImageProcessor.from_pretrained(work / "models" / "vision"))
        make_synthetic.main(["--out", str(work / "synth"), "--n", str(args.n)])
        manifest = build_shards.build(str(work / "synth" / "data.json"), str(work / "synth"), str(work / "shards"),
                                      samples_per_shard=250, workers=2)
        total = manifest["total_samples"]

        print(f"\n## Throughput: {total} synthetic samples (64 px PNG), decode + tokenize, one pass")
        print("| loader | workers | samples/s |\n|---|---|---|")
        for workers in [1, 2]:
            stream = SampleStream(resolve_shards(str(work / "shards")), *models, resampled=False)
            rate = samples_per_second(DataLoader(stream, batch_size=None, num_workers=workers), total)
            print(f"| streaming shards | {workers} | {rate:.0f} |")
        for workers in [1, 2]:
            dataset = LlavaMapDataset(work / "synth" / "data.json", work / "synth", *models)
            loader = DataLoader(dataset, batch_size=None, num_workers=workers, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
            print(f"| LLaVA map dataset | {workers} | {samples_per_second(loader, total):.0f} |")

        llava = work / "llava_like"
        make_synthetic.main(["--out", str(llava), "--n", str(args.n), "--llava-like"])
        build_shards.build(str(llava / "data.json"), str(llava), str(work / "llava_shards"), samples_per_shard=250)
        lengths = [len(tokenize_record(r, models[0], int("image" in r))[0])
                   for r in json.loads((llava / "data.json").read_text())]
        print(f"\nLLaVA-like text tokens per sample: median {statistics.median(lengths):.0f}, "
              f"mean {statistics.mean(lengths):.0f}, max {max(lengths)}")

        print(f"\n## Packing: default DataConfig (seq_len 2048, 1 row, text_tokens_per_image 64, window 64), "
              f"{args.batches} batches per N")
        print("| data | N | padding | samples/batch | truncated | dropped |\n|---|---|---|---|---|---|")
        for name, shards in [("synthetic", work / "shards"), ("LLaVA-like", work / "llava_shards")]:
            for n in [64, 144, 256]:
                pad, per_batch, truncated, dropped = padding_fraction(shards, models, n, args.batches)
                print(f"| {name} | {n} | {pad:.2%} | {per_batch:.1f} | {truncated} | {dropped} |")


if __name__ == "__main__":
    main()
