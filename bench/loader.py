"""Benchmark the data pipeline (CPU only; results go in bench/loader_results.md).

1. samples/s of the streaming loader (shards -> decode + tokenize in DataLoader workers) with
   1 and 2 workers on synthetic data (64 px PNGs, the tiny 64 px processor), next to a
   LLaVA-style map dataset (JSON + image folder, transformers' image processor, same
   tokenization) read through a DataLoader with the same worker counts;
2. real photographs at SigLIP-so400m's 384 px (its preprocessor config, written here: bicubic,
   rescale 1/255, mean and std 0.5; image_aspect pad, the shipped configs'): COCO-size JPEGs
   (about 640x480, median ~60 KB) and large ones (1,500-2,048 px), made by bench/photos.py from
   matplotlib's sample photograph. CPU time per file of the bare JPEG decode (PIL's, and
   simplejpeg's, which the pipeline decodes JPEGs with: pipeline/data/decode.py), of decode + the
   pipeline's preparation (pipeline/model/images.py) and of decode + transformers' image processor,
   in this process; the loader workers' CPU time per sample (all a worker does: tar reading,
   decoding, preparing, tokenizing, handing items over) and its ratio to the bare decode of the
   same files; the streaming loader's wall-clock samples/s with 1 and 2 workers; where a
   worker's time goes (each step timed alone and in its place, one sample after another, then
   the stream without workers, a worker, and the trainer's process receiving its samples); and
   the same photographs stored by tools.build_shards --max-image-side 384: a worker's time, and
   how far the tower's pixels move from those of the original files; and a worker's time with
   data.max_tiles 6 (7 tiles for a 4:3 photograph);
3. the training stream over one epoch of a mixture of three sources (the synthetic shards,
   LLaVA-like ones at repeat 0.5, 128 px synthetic ones at repeat 2: epochs cut into equal
   slices that start inside shards, shuffled through the default 256-sample buffer), samples/s
   with 1 and 2 workers; then, after 20 packed batches of it, the seconds to the first batch
   afresh, replayed at the same layout (bitwise) and continued at another (1 rank x 2 workers ->
   rank 0 of 2 x 1), and the size of the saved data state;
4. samples/s one GPU consumes (bench/train_step's FLOPs from the shapes: H100 SXM at MFU 0.4,
   SigLIP-so400m, 0.5B/1.5B/7B Qwen2-shaped LMs, stages 1 and 2, N = 64 and 256, 128 text
   tokens per sample) and the loader workers per GPU that takes at the measured rates;
5. the packer at N in {64, 144, 256} with the shipped stage configs' row shapes (seq_len x
   rows_per_batch) and the image budget measured on the data (text_tokens_per_image: auto), on
   the synthetic data and on a LLaVA-like length distribution (text lengths lognormal around
   ~120 tokens, 2% long ones of 600-1500 tokens, 10% text-only): padding fraction, dummy-image
   fraction (image slots the vision tower encodes without a real image), samples per batch,
   truncated and dropped samples; and, for comparison, the old fixed text_tokens_per_image 64;
6. the packer with tiles (data.max_tiles 6) at N in {64, 144, 256}, with the stage configs' rows
   and window and with longer rows and a 256-sample window, on
   the LLaVA-like lengths with a realistic aspect-ratio mix (COCO-like 4:3 45% and 3:4 25%,
   square 10%, letter-size documents 10%, 8:3 wide charts 10%; image sides a sixth of real ones,
   640x480 as 107x80, so that the tiny 64 px tower picks the grids SigLIP's 384 px would):
   padding, dummy tiles (tile slots the tower encodes without a real tile: the issue's target
   is at most 5% of tower forwards), tiles per image, the tile budget, samples per batch, truncated
   and dropped samples. --sections packing,tiles runs sections 5 and 6 alone.

Timings are the best of --repeats passes, and CPU times where the table says so: other jobs
sharing the machine delay a pass far more than they change the work it does.

    python -m bench.loader --n 3000
"""

import argparse
import dataclasses
import io
import json
import math
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import simplejpeg
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import AutoImageProcessor, SiglipImageProcessor

from bench.photos import write_photos
from bench.train_step import gpu_samples_per_second
from pipeline.data import TrainBatches
from pipeline.data.decode import Decoder, decode_rgb, first_samples
from pipeline.data.handover import loader_items
from pipeline.data.mixture import Mixture, load_mixture
from pipeline.data.stream import SampleStream
from pipeline.model.chat import load_tokenizer, tokenize_record
from pipeline.model.images import image_pixel_values, pad_to_square, resize_to_tower, tower_pixels
from pipeline.model.tiles import choose_grid, tile_count
from pipeline.run.config import DataConfig, load_config
from tools import build_shards, make_synthetic, make_tiny_models

REPO = Path(__file__).resolve().parents[1]
STAGES = ["stage1_align", "stage2_finetune"]
PHOTOS = {"coco": "COCO-size", "large": "large (>= 1,500 px)"}
MAX_IMAGE_SIDE = 384  # the tower's side: the shards a single-tile run needs
PHOTO_TILES = 6  # Ristretto's and InternVL's default tile limit


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


def so400m_processor(folder):
    """SigLIP-so400m-patch14-384's image processor, written as its preprocessor_config.json has
    it, and read back as users load it."""
    SiglipImageProcessor(size={"height": 384, "width": 384}, resample=3, do_rescale=True, rescale_factor=1 / 255,
                         do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return AutoImageProcessor.from_pretrained(folder)


def best_cpu_ms_per_item(function, items, repeats):
    """CPU milliseconds (this process's) per item of function over items: the best of `repeats`
    passes. CPU time, not wall time: other jobs on the machine delay a pass more than they slow it."""
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            function(item)
        best = min(best, time.process_time() - start)
    return 1000 * best / len(items)


def bare_decode(path):
    with Image.open(path) as image:
        image.load()


def bare_simplejpeg(data):
    simplejpeg.decode_jpeg(data, colorspace="RGB")


def pipeline_path(processor):
    """Decode and the pipeline's preparation (pipeline/model/images.py), as a loader worker does it."""
    def prepare(data):
        return tower_pixels(decode_rgb(data), processor, "pad")
    return prepare


def processor_path(processor):
    """Decode, RGB, LLaVA-1.5's pad in PIL, then transformers' image processor: the way before."""
    background = tuple(int(255 * m) for m in processor.image_mean)

    def prepare(path):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        side = max(rgb.size)
        square = Image.new("RGB", (side, side), background)
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        return processor(images=[square], return_tensors="pt")["pixel_values"]
    return prepare


STEPS = ["JPEG decode to an RGB tensor (simplejpeg)", "pad to a square", "resize to 384 px", "tokenize (chat template)"]


def worker_steps(shards, models, repeats):
    """({step: CPU ms per sample} of the steps one loader worker takes for a photograph, each timed
    alone in this process on the shards' samples, the same with each step timed in its place as a
    worker takes them one sample after another, {whole: CPU ms per sample} of the pipeline's
    decoder on the same samples and of the stream in this process). Timed alone, a step runs with
    its code and data warm in the caches: in their places the steps cost more."""
    tokenizer, processor = models
    samples = shard_samples(shards, with_images=True)  # the shards hold the files' bytes as they are
    datas = [sample["jpg"] for sample in samples]
    rgbs = [decode_rgb(data) for data in datas]
    background = [int(255 * m) for m in processor.image_mean]
    squares = [pad_to_square(rgb, background) for rgb in rgbs]
    records = [json.loads(sample["json"]) for sample in samples]
    alone = dict(zip(STEPS, [
        best_cpu_ms_per_item(decode_rgb, datas, repeats),
        best_cpu_ms_per_item(lambda rgb: pad_to_square(rgb, background), rgbs, repeats),
        best_cpu_ms_per_item(lambda square: resize_to_tower(square, processor), squares, repeats),
        best_cpu_ms_per_item(lambda record: tokenize_record(record, tokenizer, 1), records, repeats)]))
    whole = {"the same steps one sample after another (the pipeline's decoder on the shards' samples in memory)":
             best_cpu_ms_per_item(Decoder(*models, "pad"), samples, repeats),
             "the stream in this process, no workers (adds reading the tars)":
             stream_rate(shards, models, 0, len(samples), repeats, "pad")[2]}
    return alone, steps_in_place(samples, models, repeats), whole


def steps_in_place(samples, models, repeats):
    """{step: CPU ms per sample} of the worker's steps taken one sample after another, each timed
    where it runs: the pass (of `repeats`) with the least time in all."""
    tokenizer, processor = models
    background = [int(255 * m) for m in processor.image_mean]
    best = None
    for _ in range(repeats):
        spent = [0.0] * len(STEPS)
        for sample in samples:
            times = [time.process_time()]
            rgb = decode_rgb(sample["jpg"])
            times.append(time.process_time())
            square = pad_to_square(rgb, background)
            times.append(time.process_time())
            resize_to_tower(square, processor)
            times.append(time.process_time())
            tokenize_record(json.loads(sample["json"]), tokenizer, 1)
            times.append(time.process_time())
            spent = [total + end - start for total, start, end in zip(spent, times, times[1:])]
        if best is None or sum(spent) < sum(best):
            best = spent
    return {step: 1000 * seconds / len(samples) for step, seconds in zip(STEPS, best)}


def shard_samples(shards, with_images):
    """Every sample of the shards, in order: its json member, and its images when with_images."""
    return [sample for url in sorted(str(p) for p in Path(shards).glob("*.tar"))
            for sample in first_samples(url, 10**9, with_images)]


def pixel_change(files, shrunk_shards, processor):
    """(mean, max) absolute difference in 8-bit levels between the tower's pixels from the original
    files and from the shards' stored (shrunk) images, both through pipeline/model/images.py."""
    stored = {}
    for sample in shard_samples(shrunk_shards, with_images=True):
        stored[json.loads(sample["json"])["image"]] = sample["jpg"]
    diffs = []
    for path in files:
        with Image.open(path) as original, Image.open(io.BytesIO(stored[f"images/{path.name}"])) as small:
            a, b = (image_pixel_values([im], processor, "pad").int() for im in (original, small))
        diffs.append((a - b).abs())
    every = torch.cat([d.flatten() for d in diffs]).float()
    return every.mean().item(), every.max().item()


def photo_shards(work, kind, n):
    """n photographs of `kind` (bench/photos.py), a record with LLaVA-like text for each, and
    their shards; returns (image files, shard folder)."""
    folder = work / kind
    names = write_photos(folder / "images", kind, n)
    rng = random.Random(kind)
    records = [dict(make_synthetic.llava_like_record(rng, i, 0.0, make_tiny_models.WORDS), image=f"images/{name}")
               for i, name in enumerate(names)]
    (folder / "data.json").write_text(json.dumps(records))
    build_shards.build(str(folder / "data.json"), str(folder), str(work / f"{kind}_shards"), samples_per_shard=n // 6)
    return [folder / "images" / name for name in names], work / f"{kind}_shards"


def cpu_seconds(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def loader_cpu_seconds(mixture, models, workers, total, image_aspect, max_tiles=1):
    """(samples/s, CPU seconds of the workers, of this process) of one pass of the streaming loader
    over a mixture. The workers' CPU time is read once the pass has ended and they have exited."""
    stream = SampleStream(mixture, Decoder(*models, image_aspect, max_tiles=max_tiles), endless=False)
    workers_before, own_before = cpu_seconds(resource.RUSAGE_CHILDREN), cpu_seconds(resource.RUSAGE_SELF)
    rate = samples_per_second(loader_items(stream, workers), total)
    return (rate, cpu_seconds(resource.RUSAGE_CHILDREN) - workers_before,
            cpu_seconds(resource.RUSAGE_SELF) - own_before)


def stream_rate(shards, models, workers, total, repeats, image_aspect=None, max_tiles=1):
    """(samples/s, workers' CPU ms per sample, this process's CPU ms per sample) of the streaming
    loader over the shards (`total` samples), each the best of `repeats`. The CPU times count all a
    worker does per sample (tar reading, decoding, preparing, tokenizing, handing items over), and
    what this process spends receiving them (with 0 workers: all of it), at a long run's pace: a
    pass over the shards three times less a pass over them once, per added sample, so what a
    worker pays once (its start, its first touches of the models' memory, its exit) is left out."""
    once = load_mixture(str(shards))
    thrice = Mixture(tuple(dataclasses.replace(source, name=f"{source.name}-{copy}")
                           for copy in range(3) for source in once.sources))
    best = (0.0, math.inf, math.inf)
    for _ in range(repeats):
        _, cpu_once, own_once = loader_cpu_seconds(once, models, workers, total, image_aspect, max_tiles)
        rate, cpu, own = loader_cpu_seconds(thrice, models, workers, 3 * total, image_aspect, max_tiles)
        best = (max(best[0], rate), min(best[1], 1000 * (cpu - cpu_once) / (2 * total)),
                min(best[2], 1000 * (own - own_once) / (2 * total)))
    return best


def epoch_rate(mixture, models, workers, shuffle_buffer=256):
    """Wall-clock items/s of the training stream over one epoch of the mixture."""
    stream = SampleStream(mixture, Decoder(*models), shuffle_buffer=shuffle_buffer)
    start, length = time.perf_counter(), mixture.epoch_length()
    for count, _ in enumerate(loader_items(stream, workers), 1):
        if count == length:
            return length / (time.perf_counter() - start)


def first_batch_seconds(cfg, models, **kwargs):
    """Seconds to the first packed batch of a new TrainBatches, and the TrainBatches."""
    start = time.perf_counter()
    loader = TrainBatches(cfg, *models, **kwargs)
    loader.next_batch(144)
    return time.perf_counter() - start, loader


def mixture_of_three(work, n):
    """The synthetic shards (repeat 1), LLaVA-like ones (repeat 0.5) and n / 3 synthetic records
    with 128 px images (repeat 2), as a mixture file in work/."""
    large = work / "synth_128"
    make_synthetic.main(["--out", str(large), "--n", str(n // 3), "--image-size", "128", "--seed", "1"])
    build_shards.build(str(large / "data.json"), str(large), str(work / "shards_128"), samples_per_shard=250)
    path = work / "mixture.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"name": "synthetic", "shards": "shards", "repeat": 1},
                                                {"name": "llava_like", "shards": "llava_shards", "repeat": 0.5},
                                                {"name": "synthetic_128px", "shards": "shards_128", "repeat": 2}]}))
    return path


def packing_row(cfg, models, n, batches):
    """(text tokens per tile, padding, dummy-tile fraction, tile budget, samples/batch, truncated, dropped,
    tiles per image) over `batches` batches (a tile is an image when max_tiles is 1)."""
    loader = TrainBatches(cfg, *models)
    out = [loader.next_batch(n)["stats"] for _ in range(batches)]
    pad = sum(s["pad_tokens"] for s in out) / sum(s["pad_tokens"] + s["real_tokens"] for s in out)
    dummy = 1 - sum(s["num_tiles"] for s in out) / sum(s["tile_budget"] for s in out)
    per_batch = statistics.mean(s["num_samples"] for s in out)
    per_image = sum(s["num_tiles"] for s in out) / max(1, sum(s["num_images"] for s in out))
    return (loader.text_tokens_per_tile, pad, dummy, out[-1]["tile_budget"], per_batch, out[-1]["total_truncated"],
            out[-1]["total_dropped"], per_image)


# (share, width, height) of the tiled section's images: real sizes over 6 (see the module docstring)
ASPECT_MIX = [(0.45, 107, 80), (0.25, 80, 107), (0.10, 100, 100), (0.10, 283, 367), (0.10, 267, 100)]


def aspect_mix_shards(work, llava):
    """The LLaVA-like records with their image drawn from ASPECT_MIX (seeded), as shards."""
    out = work / "aspect_mix"
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (_, width, height) in enumerate(ASPECT_MIX):
        paths.append(f"images/{width}x{height}.png")
        Image.new("RGB", (width, height), (90 + 30 * i, 120, 150)).save(out / paths[-1])
    rng = random.Random(0)
    records = json.loads((llava / "data.json").read_text())
    for record in records:
        if "image" in record:
            record["image"] = rng.choices(paths, weights=[share for share, _, _ in ASPECT_MIX])[0]
    (out / "data.json").write_text(json.dumps(records))
    build_shards.build(str(out / "data.json"), str(out), str(work / "aspect_mix_shards"), samples_per_shard=250)
    return work / "aspect_mix_shards"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="synthetic records to stream")
    parser.add_argument("--batches", type=int, default=200,
                        help="packed batches per packing measurement (enough for the window's mix to settle)")
    parser.add_argument("--photos", type=int, default=600,
                        help="COCO-size photographs to stream (0, with --large-photos 0: skip the photograph and "
                             "GPU sections)")
    parser.add_argument("--large-photos", type=int, default=120, help="large (>= 1,500 px) photographs to stream")
    parser.add_argument("--repeats", type=int, default=2, help="passes per timing; the best one counts")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--sections", default="all",
                        help="all, or comma-separated of throughput, photos, mixture, packing, tiles (default: all)")
    args = parser.parse_args(argv)
    sections = {"throughput", "photos", "mixture", "packing", "tiles"} if args.sections == "all" else \
        set(args.sections.split(","))
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
        if "throughput" in sections:
            throughput(args, work, models, total)
        if "photos" in sections and args.photos and args.large_photos:  # 0: skip the photographs and the GPU
            photographs(args, work, models)
        if "mixture" in sections:
            mixture_section(args, work, models)
        if "packing" in sections:
            packing_section(args, work, models, llava)
        if "tiles" in sections:
            tiles_section(args, work, models, llava)


def throughput(args, work, models, total):
    print(f"\n## Throughput: {total} synthetic samples (64 px PNG), decode + tokenize")
    print("| loader | workers | samples/s |\n|---|---|---|")
    for workers in [1, 2]:
        rate, *_ = stream_rate(work / "shards", models, workers, total, args.repeats)
        print(f"| streaming shards | {workers} | {rate:.0f} |")
    for workers in [1, 2]:
        dataset = LlavaMapDataset(work / "synth" / "data.json", work / "synth", *models)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        print(f"| LLaVA map dataset | {workers} | {samples_per_second(loader, total):.0f} |")


def photographs(args, work, models):
    so400m = (models[0], so400m_processor(work / "so400m"))
    print("\n## Real photographs at 384 px: SigLIP-so400m's image processor, image_aspect pad")
    print("CPU milliseconds per file or sample; the loader's samples/s are wall-clock.\n")
    print("| photos | files | median file | bare JPEG decode, PIL | bare JPEG decode, simplejpeg | "
          "decode + pipeline's preparation | decode + transformers' processor | loader worker per sample | "
          "vs PIL's decode | vs simplejpeg's | loader, 1 worker | loader, 2 workers |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    per_worker, measured = {}, {}
    for kind, n in [("coco", args.photos), ("large", args.large_photos)]:
        files, shards = photo_shards(work, kind, n)
        sizes = [Image.open(f).size for f in files]
        median_kb = statistics.median(f.stat().st_size for f in files) / 1000
        datas = [path.read_bytes() for path in files]
        decode = best_cpu_ms_per_item(bare_decode, files, args.repeats)
        fast_decode = best_cpu_ms_per_item(bare_simplejpeg, datas, args.repeats)
        pipeline = best_cpu_ms_per_item(pipeline_path(so400m[1]), datas, args.repeats)
        processor = best_cpu_ms_per_item(processor_path(so400m[1]), files[:max(10, n // 10)], args.repeats)
        (rate, worker_ms, trainer_ms), (rate_2, *_) = (stream_rate(shards, so400m, workers, n, args.repeats, "pad")
                                                       for workers in [1, 2])
        per_worker[kind] = 1000 / worker_ms
        measured[kind] = files, shards, decode, worker_ms, trainer_ms
        print(f"| {PHOTOS[kind]} | {n}, {min(sizes)[0]}-{max(max(s) for s in sizes)} px | {median_kb:.0f} KB | "
              f"{decode:.2f} ms | {fast_decode:.2f} ms | {pipeline:.2f} ms | {processor:.2f} ms | {worker_ms:.2f} ms | "
              f"{worker_ms / decode:.2f}x | {worker_ms / fast_decode:.2f}x | {rate:.0f} samples/s | "
              f"{rate_2:.0f} samples/s |", flush=True)

    print("\n### Where a worker's time goes: CPU ms per sample, each step timed alone and in its place")
    print("| step | COCO-size, alone | COCO-size, in its place | large, alone | large, in its place |\n"
          "|---|---|---|---|---|")
    steps = {kind: worker_steps(shards, so400m, args.repeats) for kind, (_, shards, *_) in measured.items()}
    for step in STEPS:
        print(
            "| " + " | ".join([step] + [f"{steps[kind][part][step]:.2f}" for kind in PHOTOS for part in (0, 1)]) + " |"
        )
    print("| the steps in their places, added | - | "
          + " | - | ".join(f"{sum(steps[kind][1].values()):.2f}" for kind in PHOTOS) + " |")
    whole = {kind: steps[kind][2] | {
        "**a loader worker, all of it** (adds handing the samples over)": worker_ms,
        "the trainer's process, receiving a worker's samples": trainer_ms}
        for kind, (_, _, _, worker_ms, trainer_ms) in measured.items()}
    for step in whole["coco"]:
        print(f"| {step} | - | {whole['coco'][step]:.2f} | - | {whole['large'][step]:.2f} |")
    print("| the target: 2.5x PIL's bare decode | - | "
          + " | - | ".join(f"{2.5 * measured[kind][2]:.2f}" for kind in PHOTOS) + " |", flush=True)

    print(f"\n### Shards built with tools.build_shards --max-image-side {MAX_IMAGE_SIDE}")
    print("| photos | median stored file | loader worker per sample | vs bare decode of the original file | "
          "tower pixels against the original file's: mean / max difference (8-bit levels) |\n|---|---|---|---|---|")
    for kind, (files, _, decode, *_) in measured.items():
        shrunk = work / f"{kind}_shards_{MAX_IMAGE_SIDE}"
        build_shards.build(str(work / kind / "data.json"), str(work / kind), str(shrunk),
                           samples_per_shard=max(1, len(files) // 6), max_image_side=MAX_IMAGE_SIDE)
        stored_kb = statistics.median(len(s["jpg"]) for s in shard_samples(shrunk, with_images=True)) / 1000
        _, worker_ms, _ = stream_rate(shrunk, so400m, 1, len(files), args.repeats, "pad")
        mean, most = pixel_change(files, shrunk, so400m[1])
        print(f"| {PHOTOS[kind]} | {stored_kb:.0f} KB | {worker_ms:.2f} ms | {worker_ms / decode:.2f}x | "
              f"{mean:.2f} / {most:.0f} |", flush=True)

    print(
        f"\n### With tiles (data.max_tiles {PHOTO_TILES}): each image cut into its grid of 384 px tiles and a thumbnail"
    )
    print("| photos | tiles per image | loader worker per sample | per tile | vs bare decode | loader, 1 worker |\n"
          "|---|---|---|---|---|---|")
    for kind, (files, shards, decode, *_) in measured.items():
        tiles = statistics.mean(tile_count(choose_grid(*Image.open(f).size, PHOTO_TILES, 384)) for f in files)
        rate, worker_ms, _ = stream_rate(shards, so400m, 1, len(files), args.repeats, "pad", PHOTO_TILES)
        print(f"| {PHOTOS[kind]} | {tiles:.1f} | {worker_ms:.2f} ms | {worker_ms / tiles:.2f} ms | "
              f"{worker_ms / decode:.2f}x | {rate:.0f} samples/s |", flush=True)

    print("\n## What one GPU consumes (H100 SXM, MFU 0.4, SigLIP-so400m, 128 text tokens per sample), "
          "and the loader workers per GPU that takes (one worker: 1000 / its CPU ms per sample above)")
    print("| LM | stage | N | samples/s per GPU | workers per GPU, COCO-size | workers per GPU, large |\n"
          "|---|---|---|---|---|---|")
    for lm in ["0.5b", "1.5b", "7b"]:
        for stage in [1, 2]:
            for n in [64, 256]:
                consumed = gpu_samples_per_second(lm, stage, n)
                workers = [math.ceil(consumed / per_worker[kind]) for kind in PHOTOS]
                print(f"| {lm.upper()} | {stage} | {n} | {consumed:.0f} | {workers[0]} | {workers[1]} |")


def mixture_section(args, work, models):
    mixture_file = mixture_of_three(work, args.n)
    mixture = load_mixture(str(mixture_file))
    sizes = ", ".join(f"{s.name} {s.num_samples} x {s.repeat:g}" for s in mixture.sources)
    print(f"\n## A mixture of three sources ({sizes}: {mixture.epoch_length()} samples an epoch)")
    print("| training stream, one epoch | workers | samples/s |\n|---|---|---|")
    for workers in [1, 2]:
        rate = epoch_rate(mixture, models, workers)
        print(f"| equal slices, shuffle buffer 256 | {workers} | {rate:.0f} |", flush=True)
    print("\nResumed after 20 packed batches (4 x 2048 rows, N = 144):\n")
    cfg = DataConfig(shards=str(mixture_file), seq_len=2048, rows_per_batch=4, num_workers=2,
                     text_tokens_per_image=64)
    fresh, loader = first_batch_seconds(cfg, models)
    for _ in range(20):
        loader.next_batch(144)
    state = json.loads(json.dumps(loader.state_dict()))
    del loader
    replay, _ = first_batch_seconds(cfg, models, states=[state])
    other, _ = first_batch_seconds(dataclasses.replace(cfg, num_workers=1), models, rank=0, world_size=2,
                                   states=[state])
    print("| start | seconds to the first batch |\n|---|---|")
    print(f"| afresh, 1 rank x 2 workers | {fresh:.1f} |\n| replayed, same layout (bitwise) | {replay:.1f} |\n"
          f"| continued at 2 ranks x 1 worker (rank 0) | {other:.1f} |")
    print(f"\nSaved data state: {len(json.dumps(state))} bytes of JSON ({len(state['window'])} samples in the pack "
          f"window, {sum(len(w['missing']) for w in state['workers'])} in shuffle buffers and prefetch)")


def packing_section(args, work, models, llava):
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
            measured, pad, dummy, budget, per_batch, truncated, dropped, _ = packing_row(cfg, models, n, args.batches)
            text = f"auto ({measured:.0f})" if text_tokens == "auto" else text_tokens
            print(f"| {name} | {cfg.rows_per_batch} x {cfg.seq_len} | {text} | {n} | {pad:.2%} | {dummy:.2%} | "
                  f"{budget} | {per_batch:.1f} | {truncated} | {dropped} |", flush=True)


def tiles_section(args, work, models, llava):
    """Tiles come in large pieces (7 tiles of N slots each for a 2 x 3 grid and its thumbnail): rows
    hold fewer of them, and a wider pack window finds the fills (data.pack_window 256)."""
    shards = aspect_mix_shards(work, llava)
    print(f"\n## Packing with tiles (data.max_tiles 6): LLaVA-like lengths, a realistic aspect-ratio mix, "
          f"{args.batches} batches per N")
    print("| rows x seq_len | pack window | text tokens per tile | N | padding | dummy tiles | tiles per image | "
          "tile budget | samples/batch | truncated | dropped |\n|---|---|---|---|---|---|---|---|---|---|---|")
    shipped = [load_config(REPO / "configs" / f"{stage}.yaml").data for stage in STAGES]
    rows = [(c.rows_per_batch, c.seq_len, 64) for c in shipped] + [(2, 4096, 256), (1, 8192, 256), (1, 16384, 256)]
    for rows_per_batch, seq_len, window in rows:
        cfg = DataConfig(shards=str(shards), seq_len=seq_len, rows_per_batch=rows_per_batch, num_workers=1,
                         max_tiles=6, pack_window=window)
        for n in [64, 144, 256]:
            measured, pad, dummy, budget, per_batch, truncated, dropped, per_image = packing_row(cfg, models, n,
                                                                                                args.batches)
            print(f"| {cfg.rows_per_batch} x {cfg.seq_len} | {window} | auto ({measured:.1f}) | {n} | {pad:.2%} | "
                  f"{dummy:.2%} | {per_image:.2f} | {budget} | {per_batch:.1f} | {truncated} | {dropped} |", flush=True)

if __name__ == "__main__":
    main()
