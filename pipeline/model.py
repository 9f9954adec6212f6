"""The TokenFLEX VLM: HF vision tower -> token-adaptive projector -> HF causal LM.

The vision tower always sees the full image; the step's token count N only changes how far
the projector pools and how many slots each image marker takes in the text.

This module wires the parts, splices image embeddings into the text and computes the loss; it
also builds, loads and saves models. The image side is pipeline/vision.py (tower) and
pipeline/projector.py; inference helpers (prompts, generation, timing) are pipeline/inference.py.
"""

import importlib.util
import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from huggingface_hub import load_torch_model, save_torch_state_dict
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE
from torch import nn
from torch.nn import functional as F
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerBase,
)
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.utils import ModelOutput, is_flash_attn_2_available

# relative imports: model folders carry this module, and the ones it imports, as transformers
# remote code (modeling_tokenflex.py)
from .chat import IGNORE_INDEX, IMAGE_TOKEN, end_token_ids, load_tokenizer
from .images import normalize_pixels, pixel_table
from .inference import InferenceMixin, as_dtype
from .projector import build_projector, pooled_side
from .tiles import TileLayout
from .vision import load_vision_tower, tower_attn_implementation, tower_features

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor

MODEL_TYPE = "tokenflex_vlm"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
FLASH_ATTN_INSTALL = "pip install flash-attn --no-build-isolation"
REMOTE_CODE = Path(__file__).with_name("modeling_tokenflex.py")
AUTO_MAP = {"AutoConfig": "modeling_tokenflex.TokenFlexConfig", "AutoModel": "modeling_tokenflex.TokenFlexModel",
            "AutoModelForImageTextToText": "modeling_tokenflex.TokenFlexModel"}


@dataclass
class VLMConfig:
    """What a saved VLM folder records about its own structure (config.json)."""

    vision_config: dict
    text_config: dict
    projector: str = "adaptive_pool_swiglu"
    projector_options: dict = field(default_factory=dict)
    vision_feature_layer: int = -2
    image_token_id: int = -1
    model_type: str = MODEL_TYPE

    def grid_side(self) -> int:
        """Side of the vision tower's square patch grid."""
        vision = self.vision_config
        if "image_size" not in vision or "patch_size" not in vision:
            raise ValueError("the model's vision_config has no image_size/patch_size: can't tell its patch grid")
        return vision["image_size"] // vision["patch_size"]

    def check_token_count(self, num_vision_tokens: int) -> None:
        """ValueError unless N is a perfect square n*n, n >= 1, whose side fits the encoder's patch grid."""
        pooled_side(num_vision_tokens, self.grid_side())


@dataclass
class VLMOutput(ModelOutput):
    """A dict underneath, so ZeRO-3's hooks see the tensors in it."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None  # each supervised token's loss, detached, in supervised_targets order


def check_attn_implementation(attn_implementation: str) -> None:
    """ValueError unless the LM can run attn_implementation on this machine."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
        installed = "installed" if importlib.util.find_spec("flash_attn") else "not installed"
        raise ValueError(
            f"attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package "
            f"({FLASH_ATTN_INSTALL}); here torch sees {torch.cuda.device_count()} GPU(s) and flash-attn is "
            f"{installed}. Use sdpa instead")


class TokenFlexVLM(InferenceMixin, nn.Module):
    def __init__(self, config: VLMConfig, vision_tower, language_model, tokenizer, image_processor):
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

    # ---- construction and persistence ----

    @classmethod
    def from_components(cls, vision_path: str | Path, lm_path: str | Path, projector: str = "adaptive_pool_swiglu",
                        projector_options: dict | None = None, vision_feature_layer: int = -2,
                        attn_implementation: str = "sdpa", chat_format: str = "auto") -> "TokenFlexVLM":
        """How users start: a vision checkpoint folder plus an LM checkpoint folder, in fp32
        whatever dtype the checkpoints were saved in. Under ZeRO-3 loading (stages/align.py) the
        tower and the LM are created by zero.Init instead, partitioned and in the run's dtype,
        while the projector is not: training casts it (pipeline/engine.py: cast_parameters)."""
        check_attn_implementation(attn_implementation)
        vision_tower = load_vision_tower(vision_path, attn_implementation)
        language_model = AutoModelForCausalLM.from_pretrained(lm_path, attn_implementation=attn_implementation,
                                                              dtype=torch.float32)
        tokenizer = load_tokenizer(lm_path, chat_format)
        if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
            language_model.resize_token_embeddings(len(tokenizer))
        config = VLMConfig(
            vision_config=vision_tower.config.to_dict(),
            text_config=language_model.config.to_dict(),
            projector=projector,
            projector_options=dict(projector_options or {}),
            vision_feature_layer=vision_feature_layer,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        )
        return cls(config, vision_tower, language_model, tokenizer, AutoImageProcessor.from_pretrained(vision_path))

    @classmethod
    def from_config(cls, config: VLMConfig, tokenizer: PreTrainedTokenizerBase, image_processor: "BaseImageProcessor",
                    attn_implementation: str = "sdpa", dtype: str | torch.dtype = torch.float32) -> "TokenFlexVLM":
        """Random-init modules of the recorded shapes, in dtype (not the dtype the original
        checkpoints recorded); weights are loaded afterwards."""
        check_attn_implementation(attn_implementation)
        dtype = as_dtype(dtype)
        vision_config = AutoConfig.for_model(**config.vision_config)
        text_config = AutoConfig.for_model(**config.text_config)
        vision_tower = AutoModel.from_config(
            vision_config, dtype=dtype,
            attn_implementation=tower_attn_implementation(MODEL_MAPPING[type(vision_config)], attn_implementation))
        language_model = AutoModelForCausalLM.from_config(text_config, dtype=dtype,
                                                          attn_implementation=attn_implementation)
        model = cls(config, vision_tower, language_model, tokenizer, image_processor)
        # parameters only, like transformers' dtype=: buffers such as RoPE's inverse frequencies
        # stay fp32 (in bf16 they would shift long-context positions by radians)
        model.projector.to(dtype)
        model.tile_layout.to(dtype)
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> "TokenFlexVLM":
        """The model folder at path, on device in dtype (a name in DTYPES or a torch dtype).
        inference_placement() gives inference's defaults (a GPU in bf16 when there is one)."""
        path = Path(path)
        config = read_vlm_config(path)
        with torch.device(device):  # built where it runs: no full copy in host memory first
            model = cls.from_config(config, load_tokenizer(path), AutoImageProcessor.from_pretrained(path),
                                    attn_implementation, dtype)
        model.load_weights(path)
        return model

    def load_weights(self, path: str | Path) -> None:
        # strict=False because tied embeddings are stored once; check_loaded_keys says what else may be missing
        result = load_torch_model(self, path, strict=False)
        self.check_loaded_keys(path, set(result.missing_keys), set(result.unexpected_keys))
        self.language_model.tie_weights()

    def check_loaded_keys(self, path: str | Path, missing: set[str], unexpected: set[str]) -> None:
        """ValueError unless the folder's weights cover the model: a tied lm_head is stored once, and
        folders written before tiles have no row end (it stays random-init, unused at one tile per image)."""
        before_tiles = {"tile_layout.row_end"} & missing
        if before_tiles:
            warnings.warn(f"{path} has no tile_layout.row_end (written before tiles): serve it with one tile per "
                          f"image, or train it with data.max_tiles > 1 first", stacklevel=3)
        missing = sorted(name for name in missing - before_tiles if not self._is_tied(name))
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the model: missing {missing[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")

    def _is_tied(self, name):
        return self.language_model.config.tie_word_embeddings and name.endswith("lm_head.weight")

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        write_model_folder(path, self.config, self.tokenizer, self.image_processor, self.state_dict(), max_shard_size)

    def generation_config(self, **options: object) -> GenerationConfig:
        return generation_config(self.tokenizer, **options)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---- forward ----

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) uint8 pixels (pipeline.tiles.prepare_images) -> the tower's
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
        """Token embeddings with each image's slots (pipeline/tiles.py: its tiles' N projected
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
                f"marker must be expanded to its image's slots (pipeline/tiles.py: image_slots) and match one image"
            )
        embeds = self.language_model.get_input_embeddings()(on_device(input_ids, self.device))
        return embeds.masked_scatter(on_device(slots, self.device).unsqueeze(-1), image_slots.to(embeds.dtype))

    def forward(self, batch: dict[str, torch.Tensor], num_vision_tokens: int, return_logits: bool = False,
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

    def supervised_loss(self, hidden: torch.Tensor, targets: "LossTargets",
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


def on_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """tensor on device, copied without waiting (from pinned memory the copy overlaps the device's work)."""
    return None if tensor is None else tensor.to(device, non_blocking=True)


def real_tile_count(image_mask: torch.Tensor) -> int:
    """How many of the batch's tiles are real; ValueError unless they all come before the dummies."""
    real = int(image_mask.sum())
    if not bool(image_mask[:real].all()):
        raise ValueError("image_mask: the real tiles must come first, the dummy tiles after them")
    return real


def packed_sequences(position_ids: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor | int]:
    """flash-attention's variable-length arguments (transformers' FlashAttentionKwargs) for rows laid
    end to end, (1, total) position ids restarting at 0 per sequence: the sequences' cumulative
    lengths, on device, and the longest one's length, as an int."""
    (starts, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    starts, longest = on_device(starts, device), int(longest)
    return {"cu_seq_lens_q": starts, "cu_seq_lens_k": starts, "max_length_q": longest, "max_length_k": longest}


class LossTargets(NamedTuple):
    """A batch's supervised tokens, in supervised_targets order: where each is predicted (an index
    into the batch's rows x length positions, flattened), its label, its weight in the loss, and
    the weights' sum."""

    positions: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    total_weight: float


def loss_targets(labels: torch.Tensor, position_ids: torch.Tensor | None, reduction: str) -> LossTargets:
    """The supervised tokens of (rows, L) labels, computed where the labels lie (on the host in
    training: boolean indexing on a device would wait for it)."""
    targets, supervised = supervised_targets(labels)
    rows, length = labels.shape
    positions = (torch.arange(rows, device=labels.device)[:, None] * length
                 + torch.arange(length - 1, device=labels.device)).masked_select(supervised)
    weights = supervised_weights(labels, position_ids, reduction)
    return LossTargets(positions, targets.masked_select(supervised), weights, float(weights.sum()))


def supervised_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, supervised): each position's next-token label and where one exists. The one
    definition of a supervised token, for the loss and for counting them."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


LOSS_REDUCTIONS = ("token", "square")


def supervised_weights(labels: torch.Tensor, position_ids: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Each supervised token's weight in the loss, in supervised_targets order (fp32).

    token: 1 each, the per-token mean. square (InternVL's loss_reduction "square", as in the
    TokenFLEX authors' code): 1/sqrt(its sample's supervised tokens), so a sample with n answer
    tokens weighs sqrt(n) in all, between the per-token mean (n) and the per-sample mean (1).
    Packed samples are told apart by their position ids restarting at 0; without position ids
    (padded rows) each row is one sample.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"train.loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {reduction!r}")
    _, supervised = supervised_targets(labels)
    if reduction == "token":
        return torch.ones(int(supervised.sum()), device=labels.device)
    rows, length = labels.shape
    row_offsets = torch.arange(rows, device=labels.device)[:, None] * (length + 1)
    starts = torch.zeros_like(labels) if position_ids is None else (position_ids == 0).long().cumsum(1)
    sample_of_target = (starts + row_offsets)[:, 1:][supervised]  # a target token belongs to the next position's sample
    _, sample, counts = torch.unique(sample_of_target, return_inverse=True, return_counts=True)
    return counts[sample].float().rsqrt()


def generation_config(tokenizer: PreTrainedTokenizerBase, **options: object) -> GenerationConfig:
    return GenerationConfig(do_sample=False, eos_token_id=end_token_ids(tokenizer),
                            pad_token_id=tokenizer.pad_token_id, **options)


def write_model_folder(path: str | Path, config: VLMConfig, tokenizer: PreTrainedTokenizerBase,
                       image_processor: "BaseImageProcessor", state_dict: dict[str, torch.Tensor] | None = None,
                       max_shard_size: int | str = "5GB") -> None:
    """A model folder: config.json, tokenizer, image processor, generation config, the remote
    code through which plain transformers loads it (see modeling_tokenflex.py) and, when
    given, the weights as sharded safetensors. Without weights it records what a ZeRO
    checkpoint cannot: the structure to convert that checkpoint back into a model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(asdict(config) | {"auto_map": AUTO_MAP}, indent=2, default=str))
    for module in [REMOTE_CODE, *get_relative_import_files(REMOTE_CODE)]:
        shutil.copy(module, path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    generation_config(tokenizer).save_pretrained(path)
    if state_dict is not None:
        tied = config.text_config.get("tie_word_embeddings", False)
        weights = {k: v for k, v in state_dict.items() if not (tied and k.endswith("lm_head.weight"))}
        save_torch_state_dict(weights, path, max_shard_size=max_shard_size)


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files holding a model folder's weights (one, or the shards its index names)."""
    path = Path(path)
    index = path / SAFETENSORS_INDEX_FILE
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / SAFETENSORS_SINGLE_FILE]


def read_vlm_config(path: str | Path) -> VLMConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a saved TokenFLEX model folder")
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{config_file} has model_type {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
    raw.pop("auto_map", None)  # for transformers' Auto classes
    return VLMConfig(**raw)
