"""Rank 0's view of training: each step's metrics summed over ranks (step_metrics), and where they
go (MetricsLog): metrics.jsonl, wandb (offline unless configured), a progress bar, and a metrics
line in the log every train.log_every steps (what a Slurm log file shows best).
"""

import json
import logging
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import wandb
from tqdm import tqdm

from pipeline.run.config import Config
from pipeline.train.distributed import sum_over_ranks
from pipeline.train.flops import Work, step_flops

log = logging.getLogger("tokenflex")


def step_metrics(cfg: Config, engine: deepspeed.DeepSpeedEngine, step: int, n: int, loss: float | None,
                 stats: list[dict], seconds: float) -> dict:
    """The step's metrics over all ranks (one all-reduce); the *_total counters run since the start.

    useful_flops and executed_flops: pipeline.train.flops.step_flops, summed over ranks; on GPU,
    mfu and hfu divide them by the step time and the ranks' peak (train.peak_tflops).
    Per mixture source: samples_total/<name> (consumed since the start) and loss_by_source/<name>
    (the step's token loss over that source's supervised tokens, when it had any)."""
    world = dist.get_world_size()
    skipped = loss is None  # on every rank alike (see train_step)
    text_only = any(s["num_images"] == 0 for s in stats)
    per_step = [
        sum(s[k] for s in stats) for k in ("real_tokens", "pad_tokens", "num_samples", "tile_budget", "num_tiles")
    ]
    running = [stats[-1][k] for k in ("total_truncated", "total_skipped_corrupt")]
    flops = step_flops(engine.module, n, sum((s["work"] for s in stats), Work()))
    names = list(stats[-1]["total_samples_by_source"])
    consumed = list(stats[-1]["total_samples_by_source"].values())
    source_losses = [sum(values) for values in zip(*(s["source_losses"] for s in stats))]
    totals = sum_over_ranks([0.0 if skipped else loss, *per_step, float(text_only), *running, *flops, *consumed,
                             *source_losses])
    loss, real, pad, samples, tiles, real_tiles, text_only_ranks, truncated, corrupt, useful, executed = totals[:11]
    consumed, loss_sums, token_counts = (totals[11 + i * len(names):11 + (i + 1) * len(names)] for i in range(3))
    metrics = {
        "step": step, "num_vision_tokens": n, "update_skipped": skipped, "loss": None if skipped else loss,
        "lr": engine.get_lr()[0], "grad_norm": None if skipped else float(engine.get_global_grad_norm() or 0.0),
        "step_time_s": seconds,
        "tokens_per_s": real / seconds, "samples_per_s": samples / seconds, "padding_fraction": pad / (real + pad),
        "text_only_ranks": int(text_only_ranks), "truncated_total": int(truncated),
        "skipped_corrupt_total": int(corrupt), "useful_flops": useful, "executed_flops": executed,
        "dummy_image_fraction": 1 - real_tiles / tiles,
        "epoch": stats[-1]["epoch"],  # rank 0's data stream (see TrainBatches)
        **{f"samples_total/{name}": int(c) for name, c in zip(names, consumed)},
        **{f"loss_by_source/{name}": s / c for name, s, c in zip(names, loss_sums, token_counts) if c},
    }
    if torch.cuda.is_available():
        peak = seconds * world * cfg.train.peak_tflops * 1e12
        metrics["mfu"], metrics["hfu"] = useful / peak, executed / peak
    return metrics


class MetricsLog:
    def __init__(self, cfg: Config, config_dict: dict, start_step: int, wandb_id: str | None):
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        self.log_every, self.max_steps = cfg.train.log_every, cfg.train.max_steps
        self._drop_steps_after(start_step)
        self.run = None
        if cfg.wandb.mode != "disabled":
            self.run = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity or None, name=cfg.wandb.name or None,
                mode=cfg.wandb.mode, dir=cfg.train.output_dir, id=wandb_id, resume="allow", config=config_dict,
            )
        # at most one refresh a second: Slurm log files keep every refresh
        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc=cfg.train.stage, unit="step",
                        dynamic_ncols=True, mininterval=1.0)

    @property
    def wandb_id(self) -> str | None:
        return self.run.id if self.run else None

    def _drop_steps_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint; keep one history in the file."""
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if metrics["update_skipped"]:
            self.log_skipped(metrics)
            return
        if self.run:
            n = metrics["num_vision_tokens"]
            self.run.log({**metrics, f"loss_by_n/{n}": metrics["loss"]}, step=metrics["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", N=metrics["num_vision_tokens"],
                             tok_s=f"{metrics['tokens_per_s']:.0f}")
        if metrics["step"] % self.log_every == 0:
            mfu = f"  MFU {metrics['mfu']:.1%}" if "mfu" in metrics else ""  # GPU only
            with self.bar.external_write_mode():  # print above the bar, not glued to it
                log.info(
                    "step %d/%d  N=%d  loss %.4f  lr %.3g  grad norm %.3g  %.0f tokens/s  padding %.1f%%%s",
                    metrics["step"],
                    self.max_steps,
                    metrics["num_vision_tokens"],
                    metrics["loss"],
                    metrics["lr"],
                    metrics["grad_norm"],
                    metrics["tokens_per_s"],
                    100 * metrics["padding_fraction"],
                    mfu,
                )

    def log_skipped(self, metrics: dict) -> None:
        """A step without a supervised token on any rank: no loss, no update (train_step)."""
        if self.run:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=metrics["step"])
        self.bar.update(1)
        with self.bar.external_write_mode():
            log.warning("step %d/%d  N=%d  skipped: no rank had a supervised token (no optimizer update, "
                        "LR schedule unchanged)", metrics["step"], self.max_steps, metrics["num_vision_tokens"])

    def close(self) -> None:
        self.bar.close()
        if self.run:
            self.run.finish()
