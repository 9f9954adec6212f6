"""Rank 0's view of training: metrics.jsonl, wandb (offline unless configured), a progress bar,
and a metrics line in the log every train.log_every steps (what a Slurm log file shows best)."""

import json
import logging
from pathlib import Path

import wandb
from tqdm import tqdm

log = logging.getLogger("tokenflex")


class MetricsLog:
    def __init__(self, cfg, config_dict, start_step, wandb_id):
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
    def wandb_id(self):
        return self.run.id if self.run else None

    def _drop_steps_after(self, step):
        """A resumed run repeats the steps after its checkpoint; keep one history in the file."""
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics):
        with self.path.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.run:
            n = metrics["num_vision_tokens"]
            self.run.log({**metrics, f"loss_by_n/{n}": metrics["loss"]}, step=metrics["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", N=metrics["num_vision_tokens"],
                             tok_s=f"{metrics['tokens_per_s']:.0f}")
        if metrics["step"] % self.log_every == 0:
            with self.bar.external_write_mode():  # print above the bar, not glued to it
                log.info("step %d/%d  N=%d  loss %.4f  lr %.3g  grad norm %.3g  %.0f tokens/s  padding %.1f%%",
                         metrics["step"], self.max_steps, metrics["num_vision_tokens"], metrics["loss"],
                         metrics["lr"], metrics["grad_norm"], metrics["tokens_per_s"], 100 * metrics["padding_fraction"])

    def close(self):
        self.bar.close()
        if self.run:
            self.run.finish()
