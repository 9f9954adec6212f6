"""What a training step is worth: the work its micro-batches asked of the model (Work) and its
FLOPs, useful (for MFU) and executed (for HFU).
"""

from dataclasses import astuple, dataclass

import torch
from torch import nn

from pipeline.engine.engine import numel
from pipeline.model.loss import supervised_targets
from pipeline.model.vlm import TokenFlexVLM


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

    def __add__(self, other: "Work") -> "Work":
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

    About 70 lines on purpose: one formula, read top to bottom beside this description.
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
