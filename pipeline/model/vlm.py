"""The TokenFLEX VLM: HF vision tower -> token-adaptive projector -> HF causal LM.

The vision tower always sees the full image; the step's token count N only changes how far the
projector pools and how many slots each image marker takes in the text. This module wires the
parts, splices image embeddings into the text and computes the loss. How the model is built and
saved is construction.py; what inference feeds it and asks of it, inputs.py and inference.py.

Model folders carry this module as transformers remote code (see modeling_tokenflex.py).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from .attention import packed_sequences
from .batch import Batch
from .construction import Construction
from .folder import VLMConfig, generation_config
from .images import normalize_pixels, pixel_table
from .inference import Inference
from .loss import LossTargets, loss_targets
from .projector import build_projector
from .runtime import on_device
from .tiles import TileLayout
from .vision import tower_features

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor


@dataclass
class VLMOutput(ModelOutput):
    """A dict underneath, so ZeRO-3's hooks see the tensors in it."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None  # each supervised token's loss, detached, in supervised_targets order


class TokenFlexVLM(Construction, Inference, nn.Module):
    """The model: its parts, and the forward path from a batch to the loss."""

    def __init__(self, config: VLMConfig, vision_tower: PreTrainedModel, language_model: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase, image_processor: "BaseImageProcessor"):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.language_model = language_model
        self.projector = build_projector(
            config.projector,
            vision_tower.config.hidden_size,
            language_model.config.hidden_size,
            **config.projector_options,
        )
        self.tile_layout = TileLayout(language_model.config.hidden_size)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        # the processor's rescale and normalize, applied on the model's device (not saved: the
        # folder's image processor is the record)
        self.register_buffer("pixel_table", pixel_table(image_processor), persistent=False)

    def generation_config(self, **options: object) -> GenerationConfig:
        return generation_config(self.tokenizer, **options)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) uint8 pixels (pipeline.model.tiles.prepare_images) -> the tower's
        (tiles, patches, vision_dim) features, which every N shares. Normalized here, on the
        model's device, as the image processor normalizes."""
        dtype = next(self.projector.parameters()).dtype
        pixels = normalize_pixels(on_device(pixel_values, self.device), self.pixel_table).to(dtype)
        return tower_features(self.vision_tower, pixels, self.config.vision_feature_layer)

    def encode_images(self, pixel_values: torch.Tensor, num_vision_tokens: int) -> torch.Tensor:
        """(tiles, 3, H, W) uint8 -> (tiles, N, lm_dim)."""
        return self.projector(self.image_features(pixel_values), num_vision_tokens)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_mask: torch.Tensor,
              num_vision_tokens: int, image_grids: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's slots (pipeline/model/tiles.py: its tiles' N projected
        features each, and row ends) written into its markers' slots.

        image_mask flags the real tiles, which come first; image_grids: each real image's (rows,
        cols), in order (None: every image one tile). Both are read where they lie: training keeps
        them on the host, so reading them costs no device sync. The vision path runs even when the
        batch has no real image (all-dummy pixels): under ZeRO-3 every rank must run the same
        module forwards, or the job hangs.
        """
        features = self.encode_images(pixel_values, num_vision_tokens)
        real = real_tile_count(image_mask)
        grids = [(1, 1)] * real if image_grids is None else image_grids.tolist()
        embeds = self.splice_images(input_ids, self.tile_layout(features[:real], grids))
        # dummy tiles contribute with zero weight, so their parameters still join backward
        return embeds + 0.0 * features[real:].sum().to(embeds.dtype)

    def splice_images(self, input_ids: torch.Tensor, image_slots: torch.Tensor) -> torch.Tensor:
        """Token embeddings with (slots, lm_dim) image_slots written, in order, into the image slots.
        The slots are counted where input_ids lie (the host, in training: no device sync)."""
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != image_slots.shape[0]:
            raise ValueError(
                f"batch has {int(slots.sum())} image slots but its images fill {image_slots.shape[0]}; each image "
                f"marker must be expanded to its image's slots (tiles.py: image_slots) and match one image"
            )
        embeds = self.language_model.get_input_embeddings()(on_device(input_ids, self.device))
        return embeds.masked_scatter(on_device(slots, self.device).unsqueeze(-1), image_slots.to(embeds.dtype))

    def forward(self, batch: Batch, num_vision_tokens: int, return_logits: bool = False,
                num_items_in_batch: float | None = None, loss_reduction: str = "token") -> VLMOutput:
        """batch: input_ids, labels, position_ids (rows, L); pixel_values (M, 3, H, W) uint8 tiles;
        image_mask (M,); image_grids (images, 2), each real image's (rows, cols), optional (see embed).

        The batch may lie on the host: what the device computes with is copied there (without
        waiting, from pinned memory in training); what only says where things are (labels,
        position ids, image_mask, image_grids) is read where it lies, so a batch built on the host
        costs the step no device sync.

        loss: the cross-entropy of supervised tokens, each weighted as loss_reduction says
        (supervised_weights), summed, divided by num_items_in_batch when given (training passes
        the step's total weight over all ranks and micro-batches, so the step's loss is one
        weighted mean), else by this batch's own total weight. Logits only when asked, since
        full-vocabulary logits dominate memory at large N.
        """
        embeds = self.embed(batch["input_ids"], batch["pixel_values"], batch["image_mask"], num_vision_tokens,
                            batch.get("image_grids"))
        hidden = self.lm_hidden_states(embeds, batch.get("position_ids"), batch.get("attention_mask"))
        loss = token_losses = None
        if "labels" in batch:
            targets = loss_targets(batch["labels"], batch.get("position_ids"), loss_reduction)
            loss, token_losses = self.supervised_loss(hidden, targets, num_items_in_batch)
        logits = self.language_model.lm_head(hidden) if return_logits else None
        return VLMOutput(loss=loss, logits=logits, token_losses=token_losses)

    def lm_hidden_states(self, embeds: torch.Tensor, position_ids: torch.Tensor | None,
                         attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The LM's last hidden states over rows of packed samples (position ids restarting at 0
        per sample) or padded ones (attention_mask).

        use_cache=False matters: with a cache, transformers ignores the packed position ids and
        lets packed samples attend to each other. sdpa and eager get a block-diagonal mask built
        from the position ids; flash-attention reads them only in a batch of one row, so packed
        rows are laid end to end there: one variable-length kernel call, no L x L mask, with the
        sequences' boundaries computed once here, where the position ids lie (transformers would
        otherwise find them again, with a device sync, in every layer).
        """
        rows, length, width = embeds.shape
        flash = self.language_model.config._attn_implementation.startswith("flash_attention")
        packed = {}
        if flash and attention_mask is None and position_ids is not None:
            embeds, position_ids = embeds.reshape(1, rows * length, width), position_ids.reshape(1, rows * length)
            packed = packed_sequences(position_ids, self.device)
        hidden = self.language_model.model(
            inputs_embeds=embeds, position_ids=on_device(position_ids, self.device),
            attention_mask=on_device(attention_mask, self.device), use_cache=False, **packed).last_hidden_state
        return hidden.reshape(rows, length, width)

    def supervised_loss(self, hidden: torch.Tensor, targets: LossTargets,
                        num_items_in_batch: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy computed only where a label exists, weighted, summed, then divided as
        forward describes (a batch without supervised tokens gives a zero that still backpropagates);
        and each supervised token's loss, detached (for losses per data source).

        Image slots and prompts carry no label, so at large N most positions never get
        full-vocabulary logits: the fp32 logits that dominate memory in a plain HF loss shrink
        to the supervised rows. (A recomputed chunked loss does not survive ZeRO-3's
        parameter gathering inside backward, so this is the CPU/ZeRO-3 path.)
        """
        positions, labels, weights = (on_device(t, hidden.device) for t in (targets.positions, targets.labels,
                                                                            targets.weights))
        # lm_head runs even on zero rows: under ZeRO-3 every rank must run the same module forwards
        logits = self.language_model.lm_head(hidden.flatten(0, 1).index_select(0, positions))
        token_losses = F.cross_entropy(logits.float(), labels, reduction="none")
        total = targets.total_weight if num_items_in_batch is None else num_items_in_batch
        return (token_losses * weights).sum() / (total or 1.0), token_losses.detach()


def real_tile_count(image_mask: torch.Tensor) -> int:
    """How many of the batch's tiles are real; ValueError unless they all come before the dummies."""
    real = int(image_mask.sum())
    if not bool(image_mask[:real].all()):
        raise ValueError("image_mask: the real tiles must come first, the dummy tiles after them")
    return real
