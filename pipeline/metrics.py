"""Rank 0's view of training: metrics.jsonl, wandb (offline unless configured) and a progress bar."""

import json
from pathlib import Path

import wandb
from tqdm import tqdm


class MetricsLog:
    def __init__(self, cfg, config_dict, start_step, wandb_id):
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
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

    def close(self):
        self.bar.close()
        if self.run:
            self.run.finish()
