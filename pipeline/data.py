"""Streaming, tokenization and packing of webdataset shards into shape-uniform batches.

Workers read shards, decode images at full resolution and tokenize conversations with one
image marker per image. The main process expands each marker to the step's N slots and packs
whole samples into `rows_per_batch` rows of exactly `seq_len` tokens, so that for a given N every
rank's batch has the same shapes (ZeRO-3 ranks must run the same collective sequence).

Every item a worker yields carries its index in the DataLoader's combined stream (the loader
round-robins over workers, so index = per-worker count * num_workers + worker id). A resumed
stream replays the reading but replaces already-consumed samples by cheap placeholders before
decoding, which makes resume exact without decoding any image twice.
"""

import atexit
import ctypes
import functools
import io
import itertools
import json
import logging
import math
import multiprocessing.util  # registers multiprocessing's exit handler before ours (see _exiting)
import os
import random
import signal
import sys
from dataclasses import dataclass

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.tokens import IGNORE_INDEX, IMAGE_TOKEN, expand_image_markers

# Workers are forked after the tokenizer is built; its thread pool must not be in use then.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "img")
ROLES = {"human": "user", "gpt": "assistant"}


@dataclass
class DataConfig:
    """Where the training data comes from and how it is packed.

    shards: a folder holding manifest.json (from tools/build_shards), or a brace pattern such
        as "data/shard-{000000..000009}.tar".
    seq_len: length of every packed row, in tokens (image slots included).
    rows_per_batch: packed rows per micro-batch.
    text_tokens_per_image: sets the image budget per batch, max(1, ceil(rows_per_batch *
        seq_len / (N + text_tokens_per_image))) images: the same on every rank for a given N.
    shuffle_buffer: samples in each worker's shuffle buffer (0 or 1: no shuffling).
    num_workers: DataLoader worker processes (0: read in the main process).
    seed: seeds shard sampling and shuffling, together with epoch, rank and worker id.
    steps_per_epoch: next_batch calls (micro-batches, so optimizer steps x grad_accum) after
        which the stream is re-seeded with the next epoch; this also bounds the replay on
        resume. 0: never.
    pack_window: pending samples the packer chooses each row's fill from.
    """

    shards: str = ""
    seq_len: int = 2048
    rows_per_batch: int = 1
    text_tokens_per_image: int = 64
    shuffle_buffer: int = 256
    num_workers: int = 2
    seed: int = 0
    steps_per_epoch: int = 0
    pack_window: int = 64

    def __post_init__(self):
        # An empty `shards` is allowed here (the config's defaults must construct); it fails on use.
        if not isinstance(self.shards, str):
            raise ValueError(f"DataConfig.shards must be a shard folder or brace pattern, got {self.shards!r}")
        for name, low in [("seq_len", 8), ("rows_per_batch", 1), ("text_tokens_per_image", 0), ("shuffle_buffer", 0),
                          ("num_workers", 0), ("seed", 0), ("steps_per_epoch", 0), ("pack_window", 1)]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DataConfig.{name} must be an integer >= {low}, got {value!r}")


def image_budget(cfg, num_vision_tokens):
    """Images per batch: a pure function of the config and N, so pixel shapes agree across ranks."""
    return max(1, math.ceil(cfg.rows_per_batch * cfg.seq_len / (num_vision_tokens + cfg.text_tokens_per_image)))


def resolve_shards(spec):
    """Shard paths from a folder with manifest.json or a brace pattern; errors name what is missing."""
    if not spec:
        raise ValueError("data shards not set: give a folder with manifest.json or a brace pattern")
    if os.path.isdir(spec):
        manifest_path = os.path.join(spec, "manifest.json")
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"{spec} is a folder without manifest.json (build it with tools.build_shards)")
        with open(manifest_path) as f:
            manifest = json.load(f)
        paths = [os.path.join(spec, s["name"]) for s in manifest["shards"] if s["num_samples"] > 0]
    else:
        paths = list(braceexpand.braceexpand(spec))
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"shard {missing[0]} not found ({len(missing)} missing of {len(paths)})")
    if not paths:
        raise ValueError(f"no shards with samples in {spec}")
    return paths


def tokenize_record(record, tokenizer, num_images, key="record"):
    """input_ids and labels (assistant tokens only) of a LLaVA record, one marker per image.

    Raises ValueError naming `key` when the number of markers doesn't match num_images.
    """
    messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    input_ids = list(encoded["input_ids"])
    labels = [t if m else IGNORE_INDEX for t, m in zip(input_ids, encoded["assistant_masks"])]
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    markers = input_ids.count(image_token_id)
    if markers != num_images:
        raise ValueError(f"{key}: {markers} {IMAGE_TOKEN} tokens but {num_images} images")
    return input_ids, labels


def prompt_ids(record, tokenizer):
    """Token ids up to and including the generation prompt of the record's last reply."""
    messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"][:-1]]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])


class _ErrorCounter:
    """webdataset handler: log a broken shard or tar member with its source, count it, go on."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn):
        self.count += 1
        log.warning("skipping unreadable shard data: %r", exn)
        return True


class SampleError(Exception):
    """A sample that can't be used; reason is 'corrupt' (bad bytes) or 'invalid' (bad record)."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class SampleStream(IterableDataset):
    """Decoded, tokenized samples from shards, read by DataLoader workers.

    resampled=True: each worker draws shards forever with an RNG seeded from (seed, epoch, rank,
    worker id), so every rank yields without end and uneven shards can't stall a job.
    resampled=False: shards are split by rank, then by worker, and each sample comes once.
    Items are dicts with "kind": "sample", "skip" (undecodable; has "reason") or "placeholder"
    (consumed before a resume: index < resume_pulled and not in resume_pending).
    """

    def __init__(self, urls, tokenizer, image_processor, rank=0, world_size=1, seed=0, epoch=0, resampled=True,
                 shuffle_buffer=0, with_record=False, resume_pulled=0, resume_pending=()):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.urls, self.tokenizer, self.image_processor = list(urls), tokenizer, image_processor
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.resampled, self.shuffle_buffer, self.with_record = resampled, shuffle_buffer, with_record
        self.resume_pulled, self.resume_pending = resume_pulled, set(resume_pending)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # A str seed is hashed with SHA-512 by random.Random: stable across processes and runs.
        seed = f"{self.seed}/{self.epoch}/{self.rank}/{self.world_size}/{worker}"
        if self.resampled:
            shard_rng = random.Random(seed + "/shards")
            urls = (shard_rng.choice(self.urls) for _ in itertools.count())
        else:
            urls = iter(self.urls[self.rank::self.world_size][worker::num_workers])
        errors = _ErrorCounter()
        raw = wds.tarfile_to_samples(handler=errors)({"url": url} for url in urls)
        if self.shuffle_buffer > 1:
            raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                              rng=random.Random(seed + "/shuffle"))(raw)
        for count, sample in enumerate(raw):
            index = count * num_workers + worker
            item = {"index": index, "worker": worker, "read_errors": errors.count,
                    "shard": sample.get("__url__"), "key": sample.get("__key__")}
            if index < self.resume_pulled and index not in self.resume_pending:
                item["kind"] = "placeholder"
            else:
                try:
                    item.update(self.decode(sample), kind="sample")
                except SampleError as exn:
                    log.warning("skipping %s", exn)  # the message names the shard and key
                    item.update(kind="skip", reason=exn.reason)
            yield item

    def decode(self, sample):
        where = f"sample {sample.get('__key__')} in shard {sample.get('__url__')}"
        try:
            record = json.loads(sample["json"])
        except (KeyError, ValueError) as exn:
            raise SampleError("corrupt", f"{where}: no readable json ({exn!r})") from exn
        image_keys = [k for k in IMAGE_EXTENSIONS if k in sample]
        num_images = int("image" in record)
        if num_images != len(image_keys[:1]):
            raise SampleError("corrupt", f"{where}: record has {num_images} images, tar member(s) {image_keys}")
        pixel_values = None
        if num_images:
            try:
                with Image.open(io.BytesIO(sample[image_keys[0]])) as image:
                    pil = image.convert("RGB")
            except Exception as exn:  # PIL raises many types for bad bytes; all mean the same here
                raise SampleError("corrupt", f"{where}: undecodable image ({exn!r})") from exn
            pixel_values = self.image_processor(images=[pil], return_tensors="pt")["pixel_values"]
        try:
            input_ids, labels = tokenize_record(record, self.tokenizer, num_images, key=where)
        except (KeyError, TypeError, ValueError) as exn:
            raise SampleError("invalid", str(exn)) from exn
        out = {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}
        if self.with_record:
            out.update(record=record, prompt_ids=prompt_ids(record, self.tokenizer),
                       answer=record["conversations"][-1]["value"])
        return out


def iter_samples(shards, tokenizer, image_processor, rank=0, world_size=1, num_workers=0, with_record=True):
    """Each sample of this rank's share of the shards once, in a fixed order (for evaluation).

    Yields dicts with input_ids, labels, pixel_values ((1, 3, H, W) or None), key, shard and,
    with_record, the record itself, prompt_ids (for generation) and answer (the last reply).
    Unusable samples are logged and left out.
    """
    stream = SampleStream(resolve_shards(shards), tokenizer, image_processor, rank, world_size,
                          resampled=False, with_record=with_record)
    for item in DataLoader(stream, batch_size=None, num_workers=num_workers):
        if item["kind"] == "sample":
            yield item


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Set as this process exits. multiprocessing's own exit handler terminates (SIGTERM), then joins,
# its child processes; atexit runs handlers last-registered first, so this one runs before it.
_exiting = multiprocessing.RawValue(ctypes.c_bool, False)
atexit.register(setattr, _exiting, "value", True)


def loader_worker_setup(exiting, worker_id):
    """Runs in each training loader worker; `exiting` is _exiting (passed on, for any start method).

    Slurm signals every process of a job step: USR1 before the time limit, TERM on preemption.
    A worker ignores both, so that its training process can finish the step and save, until
    that process exits, on success or on an exception: then TERM ends the worker, or the exit
    would wait for it forever. If the training process dies without exiting (SIGKILL), the
    kernel kills the worker (PR_SET_PDEATHSIG, Linux only)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0) if exiting.value else None)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class TrainBatches:
    """Endless packed training batches for one rank; resumable exactly through state_dict().

    next_batch(N) returns tensors input_ids, labels, position_ids (rows_per_batch, seq_len),
    pixel_values (image_budget(cfg, N), 3, H, W) with image_mask (real images first, in slot
    order; zero dummies after), and a stats dict.
    """

    COUNTERS = ("samples_packed", "truncated", "dropped", "skipped_corrupt", "skipped_invalid")

    def __init__(self, cfg, tokenizer, image_processor, rank=0, world_size=1, state=None):
        self.cfg, self.tokenizer, self.image_processor = cfg, tokenizer, image_processor
        self.rank, self.world_size = rank, world_size
        self.urls = resolve_shards(cfg.shards)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # Dummy pixel shape: what the processor makes of any image (fixed-size processors only).
        self.pixel_shape = image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"].shape[1:]
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.read_errors = {}  # worker id -> shard read errors so far this epoch, as that worker reports
        self.epoch, self.batches_in_epoch = 0, 0
        if state is None:
            self._start_epoch(0)
        else:
            self._load_state(state)

    def _identity(self):
        """What must match for a saved stream position to mean the same thing."""
        c = self.cfg
        return {"seed": c.seed, "rank": self.rank, "world_size": self.world_size, "num_workers": c.num_workers,
                "shuffle_buffer": c.shuffle_buffer, "pack_window": c.pack_window,
                "shards": [os.path.basename(u) for u in self.urls]}  # names only: the data may move

    def _start_epoch(self, epoch, pulled=0, pending=()):
        """Open the stream of `epoch`; with a saved position (pulled, pending), replay up to it."""
        # Read errors are re-reported by the workers as they re-read; fold in the finished epoch's.
        self.counters["skipped_corrupt"] += sum(self.read_errors.values())
        self.epoch, self.pulled, self.window, self.read_errors = epoch, 0, [], {}
        stream = SampleStream(self.urls, self.tokenizer, self.image_processor, self.rank, self.world_size,
                              seed=self.cfg.seed, epoch=epoch, resampled=True, shuffle_buffer=self.cfg.shuffle_buffer,
                              resume_pulled=pulled, resume_pending=pending)
        self.items = iter(DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                                     worker_init_fn=functools.partial(loader_worker_setup, _exiting)))
        # Replay up to the saved position: placeholders cost a tar read, pending samples are decoded again.
        while self.pulled < pulled:
            item = self._pull()
            if item["kind"] == "sample":
                self._accept(item)
        if [s["index"] for s in self.window] != list(pending):
            raise RuntimeError(f"resume of rank {self.rank}: replayed window {[s['index'] for s in self.window]} "
                               f"!= saved {list(pending)}; did the shards change?")

    def _pull(self):
        item = next(self.items)
        self.pulled += 1
        self.read_errors[item["worker"]] = item["read_errors"]
        return item

    def _accept(self, sample):
        sample["markers"] = [i for i, t in enumerate(sample["input_ids"]) if t == self.image_token_id]
        self.window.append(sample)

    def _fill_window(self):
        while len(self.window) < self.cfg.pack_window:
            item = self._pull()
            if item["kind"] == "sample":
                self._accept(item)
            elif item["kind"] == "skip":
                self.counters["skipped_" + item["reason"]] += 1

    def _length(self, sample, n):
        """Tokens after expanding to n slots per image, capped at seq_len (longer ones get truncated)."""
        return min(len(sample["input_ids"]) + len(sample["markers"]) * (n - 1), self.cfg.seq_len)

    def _drop_unfit(self, n):
        """Drop window samples whose image slots would end past seq_len at this N (can't truncate)."""
        while True:
            self._fill_window()
            fit = [s for s in self.window
                   if not s["markers"] or s["markers"][-1] + (len(s["markers"]) - 1) * (n - 1) + n <= self.cfg.seq_len]
            if len(fit) == len(self.window):
                return
            self.counters["dropped"] += len(self.window) - len(fit)
            self.window = fit

    def _choose_row(self, n, images_left, rows_left):
        """Window positions (ascending) of the samples that fill one row best.

        The oldest sample always goes in when the image budget allows, so none waits forever;
        the rest of the row is the subset of the window with the largest total length that fits,
        using at most images_left images (subset sum with one bitset of reachable totals per
        image count). Among equal totals: the image count nearest this row's share of the budget
        (text-only samples are scarce gap fillers; later rows need images too), then older samples.
        """
        self._drop_unfit(n)
        lengths = [self._length(s, n) for s in self.window]
        images = [len(s["markers"]) for s in self.window]
        chosen, free = [], self.cfg.seq_len
        target = images_left / rows_left  # images this row should take, beyond the oldest sample's
        if images[0] <= images_left:
            target -= images[0]
            chosen, free, images_left = [0], free - lengths[0], images_left - images[0]
        mask = (1 << (free + 1)) - 1
        reach = [1] + [0] * images_left  # reach[k]: bit t set if total t is reachable with k images
        history = []
        for i in range(len(chosen), len(self.window)):
            history.append(reach)
            reach = list(reach)
            if lengths[i] <= free and images[i] <= images_left:
                for k in range(images_left - images[i], -1, -1):
                    reach[k + images[i]] |= (history[-1][k] << lengths[i]) & mask
        total = max(r.bit_length() - 1 for r in reach)
        k = min((k for k, r in enumerate(reach) if r >> total & 1), key=lambda k: abs(k - target))
        # Walk back from the newest sample, leaving out every sample the total can do without.
        for i, before in zip(range(len(self.window) - 1, -1, -1), reversed(history)):
            if not before[k] >> total & 1:
                chosen.append(i)
                total, k = total - lengths[i], k - images[i]
        return sorted(chosen)

    def next_batch(self, num_vision_tokens):
        cfg, n = self.cfg, num_vision_tokens
        if cfg.steps_per_epoch and self.batches_in_epoch == cfg.steps_per_epoch:
            self._start_epoch(self.epoch + 1)
            self.batches_in_epoch = 0
        max_images = image_budget(cfg, n)
        shape = (cfg.rows_per_batch, cfg.seq_len)
        input_ids = torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        pixel_values = torch.zeros((max_images, *self.pixel_shape))
        image_mask = torch.zeros(max_images, dtype=torch.bool)
        num_images = num_samples = real_tokens = 0
        for row in range(cfg.rows_per_batch):
            used = 0
            picks = self._choose_row(n, max_images - num_images, cfg.rows_per_batch - row)
            for sample in [self.window[i] for i in picks]:
                ids, labs = expand_image_markers(sample["input_ids"], sample["labels"], self.image_token_id, n)
                if len(ids) > cfg.seq_len:
                    ids, labs = ids[:cfg.seq_len], labs[:cfg.seq_len]
                    self.counters["truncated"] += 1
                end = used + len(ids)
                input_ids[row, used:end] = torch.tensor(ids)
                labels[row, used:end] = torch.tensor(labs)
                position_ids[row, used:end] = torch.arange(len(ids))
                for image in ([] if sample["pixel_values"] is None else sample["pixel_values"]):
                    pixel_values[num_images] = image
                    image_mask[num_images] = True
                    num_images += 1
                num_samples += 1
                used = end
            self.window = [s for i, s in enumerate(self.window) if i not in set(picks)]
            real_tokens += used
            # The padding tail is a sequence of its own, so real tokens never attend to it.
            position_ids[row, used:] = torch.arange(cfg.seq_len - used)
        self.counters["samples_packed"] += num_samples
        self.batches_in_epoch += 1
        stats = {"num_samples": num_samples, "num_images": num_images, "max_images": max_images,
                 "real_tokens": real_tokens, "pad_tokens": input_ids.numel() - real_tokens, "epoch": self.epoch,
                 **{"total_" + k: v for k, v in self.counters.items()}}
        stats["total_skipped_corrupt"] += sum(self.read_errors.values())
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "pixel_values": pixel_values, "image_mask": image_mask, "stats": stats}

    def state_dict(self):
        return {"version": 1, "identity": self._identity(), "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch, "pulled": self.pulled,
                "pending": [s["index"] for s in self.window], "counters": dict(self.counters)}

    def _load_state(self, state):
        if state.get("version") != 1:
            raise ValueError(f"data state version {state.get('version')!r} is not 1")
        saved, now = state["identity"], self._identity()
        changed = [k for k in now if saved.get(k) != now[k]]
        if changed:
            raise ValueError(f"data state was saved with different {changed}: can't resume that stream exactly")
        self.counters.update(state["counters"])
        self._start_epoch(state["epoch"], state["pulled"], state["pending"])
        self.batches_in_epoch = state["batches_in_epoch"]
