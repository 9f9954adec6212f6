"""The training data stream: shards, epochs, workers, tokenization and exact resume.

Workers read shards, turn each image into the tower's 8-bit pixels (pipeline/images.py; the model
normalizes them on its device) and tokenize conversations with one image marker per image. The main process expands each marker to the step's N slots and packs whole
samples (pipeline/packing.py) into `rows_per_batch` rows of exactly `seq_len` tokens and a fixed
image budget, so that for a given N every rank's batch has the same shapes (ZeRO-3 ranks must run
the same collective sequence).

Epochs. Epoch e reads a permutation of the shards seeded by (data.seed, e), split across ranks,
then across each rank's DataLoader workers, without replacement: over an epoch each sample is read
once across the job. A worker goes on to its next epoch as soon as it has read its share, so no
worker or rank ever waits for another, whatever the shard sizes. Each worker shuffles its epoch
through its own buffer, which empties at the epoch's end.

Resume. Every item a worker yields carries its index in the DataLoader's combined stream (the
loader round-robins over workers, so index = per-worker count * num_workers + worker id), its
epoch, and where that epoch began for its worker. A resumed stream restarts each worker at the
start of the oldest epoch it still owes (its current one, or the one before while samples of it
wait in the packing window) and replays it, replacing already-consumed samples by cheap
placeholders before decoding: resume is exact, decodes no image twice, and re-reads at most about
an epoch of each worker's shards.
"""

import atexit
import ctypes
import functools
import io
import json
import logging
import multiprocessing.util  # registers multiprocessing's exit handler before ours (see _exiting)
import os
import random
import signal
import sys
import tarfile

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.chat import IGNORE_INDEX, IMAGE_TOKEN, expand_image_markers, prompt_ids, tokenize_record
from pipeline.images import image_pixel_values, rgb_pixels, tower_pixels
from pipeline.packing import choose_row, image_budget, image_slots_fit, sample_length

# Workers are forked after the tokenizer is built; its thread pool must not be in use then.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "img")
UNFIT_LIMIT = 1000  # samples dropped in a row, at one N, before the packer gives up with an error


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


# ---- images ----

# ---- the sample stream ----

class _ErrorCounter:
    """webdataset handler: log a broken shard or tar member with its source, count it, go on."""

    def __init__(self, count=0):
        self.count = count

    def __call__(self, exn):
        self.count += 1
        log.warning("skipping unreadable shard data: %r", exn)
        return True


class SampleError(Exception):
    """A sample that can't be used; reason is 'corrupt' (bad bytes) or 'invalid' (bad record)."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def epoch_shards(urls, seed, epoch, rank, world_size, worker, num_workers):
    """One worker's share of epoch `epoch`: a seeded permutation of the shards, split by rank, then by worker."""
    # A str seed is hashed with SHA-512 by random.Random: stable across processes and runs.
    order = random.Random(f"{seed}/{epoch}").sample(urls, len(urls))
    return order[rank::world_size][worker::num_workers]


class SampleStream(IterableDataset):
    """Decoded, tokenized samples from shards, read by DataLoader workers.

    endless=True: epoch after epoch, each a seeded permutation of the shards (see the module
    docstring). endless=False: one pass over this rank's share, in the order given (evaluation).
    Items are dicts with "kind": "sample", "skip" (undecodable; has "reason") or "placeholder"
    (consumed before a resume); "index" and "worker" (see the module docstring), "epoch",
    "epoch_start" (the worker's (epoch, count, read errors) when that epoch began) and
    "read_errors" (shards or members the worker could not read so far).

    resume: {"pulled": items consumed, "pending": their indices still to deliver, "workers": per
    worker the epoch_start to restart from}; TrainBatches.state_dict() writes it.
    """

    def __init__(self, urls, tokenizer, image_processor, rank=0, world_size=1, *, endless=True, seed=0,
                 shuffle_buffer=0, image_aspect=None, with_record=False, resume=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.urls, self.tokenizer, self.image_processor = list(urls), tokenizer, image_processor
        self.rank, self.world_size, self.endless, self.seed = rank, world_size, endless, seed
        self.shuffle_buffer, self.image_aspect, self.with_record = shuffle_buffer, image_aspect, with_record
        self.resume = resume

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if not self.endless:
            shards = self.urls[self.rank::self.world_size][worker::num_workers]
            yield from self.read_epoch(shards, (0, 0, 0), worker, num_workers)
            return
        resume = self.resume or {"pulled": 0, "pending": [], "workers": [(0, 0, 0)] * num_workers}
        epoch, count, errors = resume["workers"][worker]
        # Every worker starts at the same count, so the loader's round-robin replays the saved
        # order; a worker whose restart point lies further on fills the gap without reading.
        for filler in range(min(w[1] for w in resume["workers"]), count):
            yield {"kind": "placeholder", "index": filler * num_workers + worker, "worker": worker, "epoch": epoch,
                   "epoch_start": (epoch, count, errors), "read_errors": errors}
        while True:
            shards = epoch_shards(self.urls, self.seed, epoch, self.rank, self.world_size, worker, num_workers)
            end = yield from self.read_epoch(shards, (epoch, count, errors), worker, num_workers, resume)
            if end[0] == count:
                raise RuntimeError(f"rank {self.rank}, worker {worker}: no sample readable in epoch {epoch} "
                                   f"from shards {shards}")
            epoch, (count, errors) = epoch + 1, end

    def read_epoch(self, shards, epoch_start, worker, num_workers, resume=None):
        """Yield one worker's items of one epoch; return its (count, read errors) after it."""
        epoch, count, errors = epoch_start
        pulled, pending = (resume["pulled"], set(resume["pending"])) if resume else (0, set())
        counter = _ErrorCounter(errors)
        raw = wds.tarfile_to_samples(handler=counter)({"url": url} for url in shards)
        if self.endless and self.shuffle_buffer > 1:
            shuffle_seed = f"{self.seed}/{epoch}/{self.rank}/{self.world_size}/{worker}/shuffle"
            raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(shuffle_seed))(raw)
        for sample in raw:
            index = count * num_workers + worker
            count += 1
            item = {"index": index, "worker": worker, "epoch": epoch, "epoch_start": epoch_start,
                    "read_errors": counter.count, "shard": sample.get("__url__"), "key": sample.get("__key__")}
            if index < pulled and index not in pending:
                item["kind"] = "placeholder"
            else:
                try:
                    item.update(self.decode(sample), kind="sample")
                except SampleError as exn:
                    log.warning("skipping %s", exn)  # the message names the shard and key
                    item.update(kind="skip", reason=exn.reason)
            yield item
        return count, counter.count

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
        pixels = None
        if num_images:
            try:
                with Image.open(io.BytesIO(sample[image_keys[0]])) as image:
                    rgb = rgb_pixels(image)
            except Exception as exn:  # PIL raises many types for bad bytes; all mean the same here
                raise SampleError("corrupt", f"{where}: undecodable image ({exn!r})") from exn
            pixels = tower_pixels(rgb, self.image_processor, self.image_aspect).unsqueeze(0)
        try:
            input_ids, labels = tokenize_record(record, self.tokenizer, num_images, key=where)
        except (KeyError, TypeError, ValueError) as exn:
            raise SampleError("invalid", str(exn)) from exn
        out = {"input_ids": input_ids, "labels": labels, "pixel_values": pixels}
        if self.with_record:
            out.update(record=record, prompt_ids=prompt_ids(record, self.tokenizer),
                       answer=record["conversations"][-1]["value"])
        return out


def iter_samples(shards, tokenizer, image_processor, rank=0, world_size=1, num_workers=0, with_record=True):
    """Each sample of this rank's share of the shards once, in a fixed order (for evaluation).

    Yields dicts with input_ids, labels, pixel_values ((1, 3, H, W) uint8 or None; images prepared the
    way the image processor records, see set_image_aspect), key, shard and, with_record, the
    record itself, prompt_ids (for generation) and answer (the last reply). Unusable samples are
    logged and left out.
    """
    stream = SampleStream(resolve_shards(shards), tokenizer, image_processor, rank, world_size,
                          endless=False, with_record=with_record)
    for item in DataLoader(stream, batch_size=None, num_workers=num_workers):
        if item["kind"] == "sample":
            yield item


def measure_text_tokens_per_image(urls, tokenizer, max_shards=16, samples_per_shard=64):
    """Text tokens per image in the data (text-only samples' text included): the total over the
    first samples of up to max_shards evenly spread shards, tokenized as training does, over
    their images. Every rank reads the same samples, so every rank gets the same number."""
    count = min(max_shards, len(urls))
    text = images = 0
    for url in [urls[i * len(urls) // count] for i in range(count)]:
        records = []
        try:
            with tarfile.open(url) as tar:  # reads only the json members: image bytes are skipped
                for member in tar:
                    if member.name.endswith(".json"):
                        records.append(tar.extractfile(member).read())
                        if len(records) == samples_per_shard:
                            break
        except (tarfile.TarError, OSError) as exn:  # the stream logs and skips the same damage
            log.debug("text_tokens_per_image: shard %s unreadable after %d records (%r)", url, len(records), exn)
        for raw in records:
            try:
                record = json.loads(raw)
                num_images = int("image" in record)
                input_ids, _ = tokenize_record(record, tokenizer, num_images)
            except (KeyError, TypeError, ValueError):
                continue  # the stream skips it too
            text += len(input_ids) - num_images
            images += num_images
    return text / images if images else float("inf")



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


# ---- packed batches ----

class TrainBatches:
    """Endless packed training batches for one rank; resumable exactly through state_dict().

    next_batch(N) returns tensors input_ids, labels, position_ids (rows_per_batch, seq_len),
    pixel_values (image budget, 3, H, W) uint8 with image_mask (real images first, in slot order;
    zero dummies after), and a stats dict: counts and running totals, "samples" ((shard, key,
    epoch) of each packed sample, to trace a batch back to its data) and "epoch" (the oldest epoch
    a worker of this rank is still reading).
    """

    COUNTERS = ("samples_packed", "truncated", "dropped", "skipped_corrupt", "skipped_invalid")

    def __init__(self, cfg, tokenizer, image_processor, rank=0, world_size=1, state=None):
        self.cfg, self.tokenizer, self.image_processor = cfg, tokenizer, image_processor
        self.rank, self.world_size = rank, world_size
        self.urls = resolve_shards(cfg.shards)
        self.num_workers = max(1, cfg.num_workers)
        if len(self.urls) < world_size * self.num_workers:
            raise ValueError(f"data.shards={cfg.shards} has {len(self.urls)} shards, fewer than {world_size} ranks x "
                             f"{self.num_workers} workers: every worker reads its own shards each epoch. Lower "
                             f"data.num_workers or write smaller shards (tools.build_shards --samples-per-shard)")
        if cfg.text_tokens_per_image == "auto":
            self.text_tokens_per_image = measure_text_tokens_per_image(self.urls, tokenizer)
            log.info("data.text_tokens_per_image: auto, measured %.1f text tokens per image", self.text_tokens_per_image)
        else:
            self.text_tokens_per_image = cfg.text_tokens_per_image
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # Dummy pixel shape: what the processor makes of any image (fixed-size processors only).
        self.pixel_shape = image_pixel_values([Image.new("RGB", (8, 8))], image_processor, cfg.image_aspect).shape[1:]
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        if state is not None:
            self._check_state(state)
            self.counters.update(state["counters"])
        self._open(state or {"pulled": 0, "pending": [], "workers": [(0, 0, 0)] * self.num_workers})

    def image_budget(self, num_vision_tokens):
        """Images per batch at N: a pure function of the config and the data, the same on every rank."""
        return image_budget(self.cfg.rows_per_batch * self.cfg.seq_len, num_vision_tokens, self.text_tokens_per_image)

    def _identity(self):
        """What must match for a saved stream position to mean the same thing."""
        c = self.cfg
        return {"seed": c.seed, "rank": self.rank, "world_size": self.world_size, "num_workers": c.num_workers,
                "shuffle_buffer": c.shuffle_buffer, "pack_window": c.pack_window,
                "shards": [os.path.basename(u) for u in self.urls]}  # names only: the data may move

    def _check_state(self, state):
        if state.get("version") != 2:
            raise ValueError(f"data state version {state.get('version')!r} is not 2")
        saved, now = state["identity"], self._identity()
        changed = [k for k in now if saved.get(k) != now[k]]
        if changed:
            raise ValueError(f"data state was saved with different {changed}: can't resume that stream exactly")

    def _open(self, resume):
        """Start the workers at resume's restart points and replay up to its saved position:
        placeholders cost a tar read, pending samples are decoded again."""
        workers = [tuple(w) for w in resume["workers"]]
        resume = dict(resume, workers=workers)
        self.latest = list(workers)  # per worker: epoch_start of its newest item
        self.read_errors = [errors for _, _, errors in workers]
        self.pulled, self.window = min(count for _, count, _ in workers) * self.num_workers, []
        stream = SampleStream(self.urls, self.tokenizer, self.image_processor, self.rank, self.world_size,
                              seed=self.cfg.seed, shuffle_buffer=self.cfg.shuffle_buffer,
                              image_aspect=self.cfg.image_aspect, resume=resume)
        # Workers keep about a packing window of samples ready while the trainer steps; with
        # DataLoader's default (2 per worker) they idle, and the next batch waits on them.
        prefetch = max(2, -(-self.cfg.pack_window // self.num_workers)) if self.cfg.num_workers else None
        self.items = iter(DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers, prefetch_factor=prefetch,
                                     worker_init_fn=functools.partial(loader_worker_setup, _exiting)))
        while self.pulled < resume["pulled"]:
            item = self._pull()
            if item["kind"] == "sample":
                self._accept(item)
        if [s["index"] for s in self.window] != list(resume["pending"]):
            raise RuntimeError(f"resume of rank {self.rank}: replayed window {[s['index'] for s in self.window]} "
                               f"!= saved {list(resume['pending'])}; did the shards change?")

    def _pull(self):
        item = next(self.items)
        if item["index"] != self.pulled:
            raise RuntimeError(f"rank {self.rank}: stream item {item['index']} arrived at position {self.pulled}")
        self.pulled += 1
        self.latest[item["worker"]] = tuple(item["epoch_start"])
        self.read_errors[item["worker"]] = item["read_errors"]
        return item

    def _accept(self, sample):
        sample["markers"] = [i for i, t in enumerate(sample["input_ids"]) if t == self.image_token_id]
        sample["epoch_start"] = tuple(sample["epoch_start"])
        self.window.append(sample)

    def _fill_window(self):
        while len(self.window) < self.cfg.pack_window:
            item = self._pull()
            if item["kind"] == "sample":
                self._accept(item)
            elif item["kind"] == "skip":
                self.counters["skipped_" + item["reason"]] += 1

    def _drop_unfit(self, n):
        """Drop window samples whose image slots would end past seq_len at this N (can't truncate);
        an error naming data.seq_len and N when sample after sample can't fit."""
        dropped = 0
        while True:
            self._fill_window()
            fit = [s for s in self.window if image_slots_fit(s["markers"], n, self.cfg.seq_len)]
            if len(fit) == len(self.window):
                return
            dropped += len(self.window) - len(fit)
            self.counters["dropped"] += len(self.window) - len(fit)
            self.window = fit
            if dropped > UNFIT_LIMIT:
                raise ValueError(f"{dropped} samples in a row don't fit data.seq_len={self.cfg.seq_len} at N={n}: "
                                 f"their image slots end past the row. Raise data.seq_len or take {n} out of "
                                 f"tokens.counts")

    def next_batch(self, num_vision_tokens):
        cfg, n = self.cfg, num_vision_tokens
        max_images = self.image_budget(n)
        shape = (cfg.rows_per_batch, cfg.seq_len)
        input_ids = torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        pixels = torch.zeros((max_images, *self.pixel_shape), dtype=torch.uint8)
        image_mask = torch.zeros(max_images, dtype=torch.bool)
        num_images = real_tokens = 0
        packed = []  # (shard, key, epoch) of each sample, for the stats
        for row in range(cfg.rows_per_batch):
            self._drop_unfit(n)
            picks = choose_row([sample_length(len(s["input_ids"]), len(s["markers"]), n, cfg.seq_len) for s in self.window],
                               [len(s["markers"]) for s in self.window], cfg.seq_len, max_images - num_images,
                               (max_images - num_images) / (cfg.rows_per_batch - row))
            used = 0
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
                    pixels[num_images] = image
                    image_mask[num_images] = True
                    num_images += 1
                packed.append((os.path.basename(sample["shard"]), sample["key"], sample["epoch"]))
                used = end
            self.window = [s for i, s in enumerate(self.window) if i not in set(picks)]
            real_tokens += used
            # The padding tail is a sequence of its own, so real tokens never attend to it.
            position_ids[row, used:] = torch.arange(cfg.seq_len - used)
        num_samples = len(packed)
        self.counters["samples_packed"] += num_samples
        stats = {"samples": packed, "num_samples": num_samples, "num_images": num_images, "max_images": max_images,
                 "real_tokens": real_tokens, "pad_tokens": input_ids.numel() - real_tokens,
                 "epoch": min(epoch for epoch, _, _ in self.latest),
                 **{"total_" + k: v for k, v in self.counters.items()}}
        stats["total_skipped_corrupt"] += sum(self.read_errors)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "pixel_values": pixels, "image_mask": image_mask, "stats": stats}

    def state_dict(self):
        """The stream position: items consumed, the window's indices, and per worker the epoch start
        to replay from (the oldest of its newest item's and its waiting samples')."""
        restart = list(self.latest)
        for sample in self.window:
            restart[sample["worker"]] = min(restart[sample["worker"]], sample["epoch_start"])
        return {"version": 2, "identity": self._identity(), "pulled": self.pulled,
                "pending": [s["index"] for s in self.window], "workers": [list(w) for w in restart],
                "counters": dict(self.counters)}


def next_epoch_state(saved, rank, world_size):
    """A TrainBatches state at the start of the epoch after the newest one in `saved` (a state of
    another rank layout, e.g. rank 0's), for `rank` of `world_size`. Returns (state, epoch)."""
    epoch = max(w[0] for w in saved["workers"]) + 1
    state = dict(saved, identity=dict(saved["identity"], rank=rank, world_size=world_size), pulled=0, pending=[],
                 workers=[[epoch, 0, 0]] * len(saved["workers"]))
    return state, epoch
