"""What a training step is worth and rank 0's view of training.

Work and step_flops: a step's FLOPs, useful (for MFU) and executed (for HFU), from what its
batches held. MetricsLog: metrics.jsonl, wandb (offline unless configured), a progress bar, and
a metrics line in the log every train.log_every steps (what a Slurm log file shows best).
"""

import json
import logging
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
import wandb
from torch import nn
from tqdm import tqdm

from pipeline.engine import numel
from pipeline.model import TokenFlexVLM, supervised_targets

log = logging.getLogger("tokenflex")


@dataclass(frozen=True)
class Work:
    """What micro-batches ask of the model, counted from their tensors; Works add up.

    Position ids restart at 0 for every packed sample and for a row's padding tail, so they
    cut rows into segments; a segment of nothing but pad tokens is padding.
    """

    positions: int = 0  # LM positions run, padding included
    tokens: int = 0  # positions holding a sample
    supervised: int = 0  # positions with a next-token label: the rows lm_head runs on
    row_scores: int = 0  # sum of row length²: the attention scores sdpa computes under the packed mask
    sample_scores: int = 0  # sum of sample length²: the scores inside samples, all that attention needs
    images: int = 0  # images the tower encodes, dummies included
    real_images: int = 0

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor], pad_token_id: int | None) -> "Work":
        """pad_token_id None: the batch has no padding."""
        input_ids = batch["input_ids"]
        rows, length = input_ids.shape
        segment = (batch["position_ids"] == 0).flatten().cumsum(0) - 1  # each row starts a segment
        lengths = torch.bincount(segment)
        if pad_token_id is not None:
            lengths = lengths[torch.bincount(segment, weights=(input_ids.flatten() != pad_token_id).double()) > 0]
        return cls(positions=rows * length, tokens=int(lengths.sum()),
                   supervised=int(supervised_targets(batch["labels"])[1].sum()),
                   row_scores=rows * length ** 2, sample_scores=int((lengths ** 2).sum()),
                   images=len(batch["pixel_values"]), real_images=int(batch["image_mask"].sum()))

    def __add__(self, other):
        return Work(*(a + b for a, b in zip(astuple(self), astuple(other))))


def matmul_weights(module: nn.Module) -> int:
    """Weights that multiply activations: Linear and Conv layers. Embedding lookups, norms and
    biases are not matmuls (torch's FlopCounterMode leaves them out too)."""
    return sum(numel(m.weight) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def step_flops(model: TokenFlexVLM, num_vision_tokens: int, work: Work) -> tuple[int, int]:
    """(useful, executed) FLOPs of a training step over `work`: matmuls and attention scores.

    Useful work follows PaLM's MFU convention (appendix B), counting only what training needs.
    A matmul costs 2 FLOPs per weight and token forward; backward adds 2 for the weight's
    gradient when the weight trains, and 2 for its input's gradient when something before it
    trains. So trainable weights count 6x per token, frozen weights that gradients flow
    through (the LM in stage 1) 4x, a frozen vision tower 2x, and a trained tower's patch
    embedding 4x (its input is pixels). Attention scores cost 4 x width x length² per layer
    forward and twice that backward, over each packed sample's own length (the block-diagonal
    shape). lm_head runs on supervised positions only. Padding and dummy images count nothing.

    Executed work (for HFU) is what the step runs: padding and dummy images too; attention over
    whole rows (sdpa computes every score under the packed mask); recomputation: sdpa's fused
    kernels compute the scores again in backward (2.5 forwards, not 2), and checkpointed layers
    run their forward again; and, forward only, tower work whose output nothing reads: layers
    after vision_feature_layer and SigLIP's attention-pooling head (its key/value projections
    of every patch, which dominate it).
    """
    lm, tower, projector = model.language_model, model.vision_tower, model.projector
    tower_trains, projector_trains, lm_trains = trains(tower), trains(projector), trains(lm)
    through_lm = tower_trains or projector_trains or lm_trains  # gradients flow back through the LM
    # passes over a part's weights, a forward being 1
    lm_passes = 1 + lm_trains + through_lm
    # the default projector's matmuls follow its own trainable norm (mlp2x_gelu's first one
    # follows nothing trainable when the tower is frozen: counted one pass high)
    projector_passes = 1 + projector_trains + (projector_trains or tower_trains)
    patch_passes, tower_passes = 1 + tower_trains, 1 + 2 * tower_trains

    config = lm.config
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    lm_position, lm_head = 2 * matmul_weights(lm.model), 2 * numel(lm.get_output_embeddings().weight)
    lm_score = 4 * width * config.num_hidden_layers

    vision = tower.config
    patches = (vision.image_size // vision.patch_size) ** 2
    layers = vision.num_hidden_layers
    used_layers = model.config.vision_feature_layer % (layers + 1)  # hidden_states[0] is the embeddings
    patch = 2 * matmul_weights(tower.embeddings) * patches
    layer_linear = 2 * matmul_weights(tower.encoder.layers[0]) * patches
    layer_scores = 4 * vision.hidden_size * patches ** 2
    # SigLIP's attention-pooling head: one probe query over every patch. Per patch, the key and
    # value projections (4 w²) and the probe's score and weighted value (4 w); for the probe
    # alone, its query projection (2 w²), the out projection and the MLP (2 per weight).
    width_v, pooling_head = vision.hidden_size, getattr(tower, "head", None)
    head = (4 * width_v * (width_v + 1) * patches + 2 * width_v ** 2 + 2 * matmul_weights(pooling_head)
            if pooling_head is not None else 0)
    pooled = 2 * matmul_weights(projector) * num_vision_tokens

    def flops(executed: bool) -> int:
        positions, scores, images = ((work.positions, work.row_scores, work.images) if executed
                                     else (work.tokens, work.sample_scores, work.real_images))
        score_backward = 2.5 if executed else 2
        total = (lm_passes * (lm_position * positions + lm_head * work.supervised)
                 + (1 + score_backward * through_lm) * lm_score * scores)
        per_image = (patch_passes * patch + projector_passes * pooled
                     + used_layers * (tower_passes * layer_linear + (1 + score_backward * tower_trains) * layer_scores))
        total += per_image * images
        if executed:
            total += images * ((layers - used_layers) * (layer_linear + layer_scores) + head)
            if lm.is_activation_checkpointing:
                total += lm_position * positions + lm_score * scores
            if tower.is_activation_checkpointing:
                total += images * used_layers * (layer_linear + layer_scores)
        return int(total)

    return flops(executed=False), flops(executed=True)


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
    def wandb_id(self) -> str | None:
        return self.run.id if self.run else None

    def _drop_steps_after(self, step):
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
                log.info("step %d/%d  N=%d  loss %.4f  lr %.3g  grad norm %.3g  %.0f tokens/s  padding %.1f%%%s",
                         metrics["step"], self.max_steps, metrics["num_vision_tokens"], metrics["loss"],
                         metrics["lr"], metrics["grad_norm"], metrics["tokens_per_s"], 100 * metrics["padding_fraction"],
                         mfu)

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
