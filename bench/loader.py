"""Benchmark the data pipeline on synthetic data (CPU only; results go in bench/loader_results.md).

1. samples/s of the streaming loader (shards -> decode + tokenize in DataLoader workers) with
   1 and 2 workers, next to a LLaVA-style map dataset (JSON + image folder, same decode and
   tokenization) read through a DataLoader with the same worker counts; and of the training
   stream over one epoch of a mixture of three sources (the synthetic shards, LLaVA-like ones
   at repeat 0.5, 128 px synthetic ones at repeat 2: epochs cut into equal slices that start
   mid-shard, shuffled through the default 256-sample buffer);
2. resuming that mixture after 20 packed batches: seconds to the first batch afresh, replayed at
   the same layout (bitwise) and continued at another (1 rank x 2 workers -> rank 0 of 2 x 1),
   and the size of the saved data state;
3. the packer at N in {64, 144, 256} with the shipped stage configs' row shapes (seq_len x
   rows_per_batch) and the image budget measured on the data (text_tokens_per_image: auto), on
   the synthetic data and on a LLaVA-like length distribution (text lengths lognormal around
   ~120 tokens, 2% long ones of 600-1500 tokens, 10% text-only): padding fraction, dummy-image
   fraction (image slots the vision tower encodes without a real image), samples per batch,
   truncated and dropped samples; and, for comparison, the old fixed text_tokens_per_image 64.

    python -m bench.loader --n 3000
"""

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import AutoImageProcessor

from pipeline.chat import load_tokenizer, tokenize_record
import yaml

from pipeline.config import DataConfig, load_config
from pipeline.data import TrainBatches
from pipeline.data.decode import Decoder
from pipeline.data.mixture import load_mixture
from pipeline.data.stream import SampleStream
from tools import build_shards, make_synthetic, make_tiny_models

REPO = Path(__file__).resolve().parents[1]
STAGES = ["stage1_align", "stage2_finetune"]


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


def epoch_rate(mixture, models, workers, shuffle_buffer=256):
    """Items/s of the training stream over one epoch of the mixture."""
    stream = SampleStream(mixture, Decoder(*models), shuffle_buffer=shuffle_buffer)
    start, length = time.perf_counter(), mixture.epoch_length()
    for count, _ in enumerate(DataLoader(stream, batch_size=None, num_workers=workers), 1):
        if count == length:
            return length / (time.perf_counter() - start)


def first_batch_seconds(cfg, models, **kwargs):
    start = time.perf_counter()
    loader = TrainBatches(cfg, *models, **kwargs)
    loader.next_batch(144)
    return time.perf_counter() - start, loader


def packing_row(cfg, models, n, batches):
    """(text tokens per image, padding, dummy-image fraction, image budget, samples/batch, truncated, dropped)
    over `batches` batches."""
    loader = TrainBatches(cfg, *models)
    out = [loader.next_batch(n)["stats"] for _ in range(batches)]
    pad = sum(s["pad_tokens"] for s in out) / sum(s["pad_tokens"] + s["real_tokens"] for s in out)
    dummy = 1 - sum(s["num_images"] for s in out) / sum(s["max_images"] for s in out)
    per_batch = statistics.mean(s["num_samples"] for s in out)
    return (loader.text_tokens_per_image, pad, dummy, out[-1]["max_images"], per_batch, out[-1]["total_truncated"],
            out[-1]["total_dropped"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="synthetic records to stream")
    parser.add_argument("--batches", type=int, default=60, help="packed batches per packing measurement")
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
        llava = work / "llava_like"
        make_synthetic.main(["--out", str(llava), "--n", str(args.n), "--llava-like"])
        build_shards.build(str(llava / "data.json"), str(llava), str(work / "llava_shards"), samples_per_shard=250)
        large = work / "synth_128"
        make_synthetic.main(["--out", str(large), "--n", str(args.n // 3), "--image-size", "128", "--seed", "1"])
        build_shards.build(str(large / "data.json"), str(large), str(work / "shards_128"), samples_per_shard=250)
        mixture_file = work / "mixture.yaml"
        mixture_file.write_text(yaml.safe_dump({"sources": [
            {"name": "synthetic", "shards": "shards", "repeat": 1},
            {"name": "llava_like", "shards": "llava_shards", "repeat": 0.5},
            {"name": "synthetic_128px", "shards": "shards_128", "repeat": 2}]}))
        mixture = load_mixture(str(mixture_file))

        print(f"\n## Throughput: {total} synthetic samples (64 px PNG), decode + tokenize, one pass")
        print("| loader | workers | samples/s |\n|---|---|---|")
        for workers in [1, 2]:
            stream = SampleStream(load_mixture(str(work / "shards")), Decoder(*models), endless=False)
            rate = samples_per_second(DataLoader(stream, batch_size=None, num_workers=workers), total)
            print(f"| streaming shards | {workers} | {rate:.0f} |")
        for workers in [1, 2]:
            dataset = LlavaMapDataset(work / "synth" / "data.json", work / "synth", *models)
            loader = DataLoader(dataset, batch_size=None, num_workers=workers, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
            print(f"| LLaVA map dataset | {workers} | {samples_per_second(loader, total):.0f} |")
        sizes = ", ".join(f"{s.name} {s.num_samples} x {s.repeat:g}" for s in mixture.sources)
        for workers in [1, 2]:
            print(f"| training stream, mixture of 3 sources ({sizes}: {mixture.epoch_length()} an epoch) | {workers} | "
                  f"{epoch_rate(mixture, models, workers):.0f} |", flush=True)

        print("\n## Resume of the mixture after 20 packed batches (4 x 2048 rows, N = 144)")
        cfg = DataConfig(shards=str(mixture_file), seq_len=2048, rows_per_batch=4, num_workers=2, text_tokens_per_image=64)
        fresh, loader = first_batch_seconds(cfg, models)
        for _ in range(20):
            loader.next_batch(144)
        state = json.loads(json.dumps(loader.state_dict()))
        del loader
        replay, _ = first_batch_seconds(cfg, models, states=[state])
        other, _ = first_batch_seconds(dataclasses.replace(cfg, num_workers=1), models, rank=0, world_size=2, states=[state])
        print("| start | seconds to the first batch |\n|---|---|")
        print(f"| afresh, 1 rank x 2 workers | {fresh:.1f} |\n| replayed, same layout (bitwise) | {replay:.1f} |\n"
              f"| continued at 2 ranks x 1 worker (rank 0) | {other:.1f} |")
        print(f"\nSaved data state: {len(json.dumps(state))} bytes of JSON ({len(state['window'])} samples in the pack "
              f"window, {sum(len(w['missing']) for w in state['workers'])} in shuffle buffers and prefetch)")

        lengths = [len(tokenize_record(r, models[0], int("image" in r))[0])
                   for r in json.loads((llava / "data.json").read_text())]
        print(f"\nLLaVA-like text tokens per sample: median {statistics.median(lengths):.0f}, "
              f"mean {statistics.mean(lengths):.0f}, max {max(lengths)}")

        print(f"\n## Packing: the stage configs' rows, window 64, {args.batches} batches per N")
        print("| data | rows x seq_len | text_tokens_per_image | N | padding | dummy images | image budget | "
              "samples/batch | truncated | dropped |\n|---|---|---|---|---|---|---|---|---|---|")
        settings = [(name, shards, stage, "auto") for name, shards in [("synthetic", work / "shards"),
                                                                      ("LLaVA-like", work / "llava_shards")]
                    for stage in STAGES] + [("LLaVA-like", work / "llava_shards", STAGES[0], 64)]
        for name, shards, stage, text_tokens in settings:
            shipped = load_config(REPO / "configs" / f"{stage}.yaml").data
            cfg = DataConfig(shards=str(shards), seq_len=shipped.seq_len, rows_per_batch=shipped.rows_per_batch,
                             text_tokens_per_image=text_tokens, num_workers=1)
            for n in [64, 144, 256]:
                measured, pad, dummy, budget, per_batch, truncated, dropped = packing_row(cfg, models, n, args.batches)
                text = f"auto ({measured:.0f})" if text_tokens == "auto" else text_tokens
                print(f"| {name} | {cfg.rows_per_batch} x {cfg.seq_len} | {text} | {n} | {pad:.2%} | {dummy:.2%} | "
                      f"{budget} | {per_batch:.1f} | {truncated} | {dropped} |", flush=True)


if __name__ == "__main__":
    main()
