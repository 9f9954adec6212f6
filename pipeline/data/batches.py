"""Packed training batches for one rank, resumable at any world size and worker count.

The main process keeps a window of decoded samples from its stream (pipeline/data/stream.py),
drops those that can't fit at the step's N, chooses each row's samples (packing.py) and
assembles them into a batch of fixed shapes (assemble.py). The resume state is state.py's.
"""

import copy
import logging
import os
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from pipeline.data.assemble import PackedBatch, assemble, slots_of, tiles_of
from pipeline.data.decode import Decoder, measure_text_tokens_per_tile
from pipeline.data.mixture import load_mixture
from pipeline.data.packing import choose_row, image_slots_fit, sample_length, tile_budget
from pipeline.data.plan import count
from pipeline.data.state import (
    VERSION,
    check_compatible,
    open_epochs_of,
    remaining_positions,
    replay_plan,
    summed_counters,
)
from pipeline.data.stream import RankStream
from pipeline.model.chat import IMAGE_TOKEN
from pipeline.model.images import tower_size
from pipeline.run.config import DataConfig

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor

log = logging.getLogger(__name__)

UNFIT_LIMIT = 1000  # samples dropped in a row, at one N, before the packer gives up with an error


class TrainBatches:
    """Endless packed training batches for one rank: next_batch(N) gives a PackedBatch (assemble.py),
    whose stats also hold "epoch", the oldest epoch a worker of this rank is still reading.

    states: every rank's state_dict() from a checkpoint, in rank order, or None to start afresh.
    (About 160 lines: the pack window, the stream and its resume state are one state, saved together.)
    """

    COUNTERS = ("samples_packed", "truncated", "dropped", "skipped_corrupt", "skipped_invalid")

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, image_processor: "BaseImageProcessor",
                 rank: int = 0, world_size: int = 1, states: list[dict] | None = None):
        self.cfg, self.tokenizer, self.image_processor = cfg, tokenizer, image_processor
        self.rank, self.world_size = rank, world_size
        self.mixture = load_mixture(cfg.shards)
        self.num_workers = max(1, cfg.num_workers)
        self.length = self.mixture.epoch_length()
        if self.length < world_size * self.num_workers:
            raise ValueError(f"data.shards={cfg.shards} gives {self.length} samples an epoch, fewer than {world_size} "
                             f"ranks x {self.num_workers} workers: every worker reads its own slice of each epoch. "
                             f"Lower data.num_workers or add data")
        self.pixel_shape = (3, *tower_size(image_processor))  # every tile's, dummies' too
        if cfg.text_tokens_per_image == "auto":
            tiling = (cfg.max_tiles, cfg.multi_image_max_tiles, self.pixel_shape[2])
            self.text_tokens_per_tile = measure_text_tokens_per_tile(self.mixture, tokenizer, tiling)
            log.info("data.text_tokens_per_image: auto, measured %.1f text tokens per tile", self.text_tokens_per_tile)
        else:
            self.text_tokens_per_tile = cfg.text_tokens_per_image
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.counters = {
            **dict.fromkeys(self.COUNTERS, 0),
            "samples_by_source": {s.name: 0 for s in self.mixture.sources},
        }
        for state in states or []:
            check_compatible(state, self._identity())
        if not states:
            self._open(first_epoch=0, open_epochs={})
        elif len(states) == world_size and states[rank]["layout"] == self._layout():
            self.counters = copy.deepcopy(states[rank]["counters"])
            self._open(replay=states[rank])
        else:
            self._continue(states)

    def tile_budget(self, num_vision_tokens: int) -> int:
        """Tiles per batch at N (images when max_tiles is 1): a pure function of the config and the
        data, the same on every rank."""
        return tile_budget(self.cfg.rows_per_batch * self.cfg.seq_len, num_vision_tokens, self.text_tokens_per_tile)

    def _identity(self) -> dict:
        """What must match for a saved position in the data to mean the same samples."""
        return {"mixture": self.mixture.fingerprint(), "seed": self.cfg.seed}

    def _layout(self) -> dict:
        """What must also match to replay the stream bit for bit."""
        c = self.cfg
        # num_workers 0 (reading in this process) and 1 give the same stream
        return {"rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
                "shuffle_buffer": c.shuffle_buffer, "pack_window": c.pack_window}

    def _continue(self, states: list) -> None:
        """Resume from the states of another layout: what the job had not consumed of the epochs it
        was in is split over this layout's ranks x workers; rank 0 carries on the job's counters."""
        remaining = remaining_positions(states, self.length)
        if self.rank == 0:
            self.counters = summed_counters(states)
            saved = states[0]["layout"]
            log.warning("data state saved by %d ranks x %d workers, resumed by %d x %d: epoch %s continues, its %d "
                        "samples not yet consumed split over the new ranks and workers (not bitwise as an "
                        "uninterrupted run)", saved["world_size"], saved["num_workers"], self.world_size,
                        self.num_workers, "-".join(map(str, sorted({min(remaining), max(remaining)}))),
                        sum(count(i) for i in remaining.values()))
        self._open(first_epoch=min(remaining), open_epochs=remaining)

    def _open(self, first_epoch: int = 0, open_epochs: dict | None = None, replay: dict | None = None) -> None:
        """Start the workers, afresh from first_epoch or replaying a state of this same layout up to
        its saved position: consumed positions come back as placeholders, pending ones decoded."""
        decoder = Decoder(self.tokenizer, self.image_processor, self.cfg.image_aspect,
                          max_tiles=self.cfg.max_tiles, multi_image_max_tiles=self.cfg.multi_image_max_tiles)
        self.stream = RankStream(self.mixture, decoder, self.cfg, self.rank, self.world_size, first_epoch,
                                 open_epochs_of(replay) if replay else open_epochs,
                                 replay_plan(replay) if replay else None)
        self.window = []
        if replay is None:
            return
        while self.stream.pulled < replay["pulled"]:
            item = self.stream.pull()
            if item["kind"] == "sample":
                self._accept(item)
        saved = [tuple(w[:3]) for w in replay["window"]]
        if [(s["worker"], s["epoch"], s["position"]) for s in self.window] != saved or \
                [p.as_dict() for p in self.stream.progress] != [{k: w[k] for k in ("epoch", "read", "missing")}
                                                               for w in replay["workers"]]:
            raise RuntimeError(f"resume of rank {self.rank}: the replayed stream differs from the saved one; "
                               f"did the shards change?")

    def _accept(self, sample: dict) -> None:
        sample["markers"] = [i for i, t in enumerate(sample["input_ids"]) if t == self.image_token_id]
        sample["epoch_start"] = tuple(sample["epoch_start"])
        self.window.append(sample)

    def _fill_window(self) -> None:
        while len(self.window) < self.cfg.pack_window:
            item = self.stream.pull()
            if item["kind"] == "sample":
                self._accept(item)
            elif item["kind"] == "skip":
                self.counters["skipped_" + item["reason"]] += 1

    def _drop_unfit(self, n: int) -> None:
        """Drop window samples whose image slots would end past seq_len at this N (can't truncate),
        or with more tiles than a batch holds at this N; an error naming data.seq_len and N when
        sample after sample can't fit."""
        dropped, budget = 0, self.tile_budget(n)
        while True:
            self._fill_window()
            fit = [s for s in self.window
                   if image_slots_fit(s["markers"], slots_of(s, n), self.cfg.seq_len) and tiles_of(s) <= budget]
            if len(fit) == len(self.window):
                return
            dropped += len(self.window) - len(fit)
            self.counters["dropped"] += len(self.window) - len(fit)
            self.window = fit
            if dropped > UNFIT_LIMIT:
                raise ValueError(f"{dropped} samples in a row don't fit data.seq_len={self.cfg.seq_len} at N={n}: "
                                 f"their image slots end past the row, or their tiles outnumber a batch's "
                                 f"{budget}. Raise data.seq_len, lower data.max_tiles or take {n} out of "
                                 f"tokens.counts")

    def next_batch(self, num_vision_tokens: int) -> PackedBatch:
        """The next packed batch at N: row by row, the window's samples that fill the row best
        (packing.choose_row), assembled (assemble.py); its stats beside it."""
        cfg, n = self.cfg, num_vision_tokens
        budget = self.tile_budget(n)
        rows, tiles_used = [], 0
        for row in range(cfg.rows_per_batch):
            self._drop_unfit(n)
            picks = choose_row([sample_length(len(s["input_ids"]), slots_of(s, n), cfg.seq_len) for s in self.window],
                               [tiles_of(s) for s in self.window], cfg.seq_len, budget - tiles_used,
                               (budget - tiles_used) / (cfg.rows_per_batch - row))
            rows.append([self.window[i] for i in picks])
            self.window = [s for i, s in enumerate(self.window) if i not in set(picks)]
            tiles_used += sum(tiles_of(s) for s in rows[-1])
        batch, truncated, real_tokens = assemble(rows, n, cfg.seq_len, budget, self.pixel_shape,
                                                 self.tokenizer.pad_token_id, self.image_token_id)
        names = [s.name for s in self.mixture.sources]
        packed = [(names[s["source"]], os.path.basename(s["shard"]), s["key"], s["epoch"]) for row in rows for s in row]
        for name, *_ in packed:
            self.counters["samples_by_source"][name] += 1
        self.counters["truncated"] += truncated
        self.counters["samples_packed"] += len(packed)
        stats = {"samples": packed, "num_samples": len(packed), "num_images": len(batch["image_grids"]),
                 "num_tiles": tiles_used, "tile_budget": budget, "real_tokens": real_tokens,
                 "pad_tokens": batch["input_ids"].numel() - real_tokens, "epoch": self.stream.epoch,
                 **{"total_" + k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counters.items()}}
        return PackedBatch(**batch, stats=stats)

    def state_dict(self) -> dict:
        """Small and layout-independent (see pipeline/data/state.py): the stream's position, the
        window's samples (positions), the counters."""
        return {"version": VERSION, "identity": self._identity(), "layout": self._layout(),
                **self.stream.state(self.window),
                "window": [[s["worker"], s["epoch"], s["position"], s["index"]] for s in self.window],
                "counters": {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counters.items()}}

