"""How a TokenFlexVLM is built and saved (a mixin): from checkpoints of its parts, from the structure a
model folder records, from a model folder; and written as one.

Model folders carry this module as transformers remote code (see modeling_tokenflex.py).
"""

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Self

import torch
from huggingface_hub import load_torch_model
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    PreTrainedTokenizerBase,
)

from .attention import check_attn_implementation
from .chat import IMAGE_TOKEN, load_tokenizer
from .folder import VLMConfig, read_vlm_config, write_model_folder
from .runtime import as_dtype
from .vision import load_vision_tower, tower_attn_implementation

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor


class Construction:
    """TokenFlexVLM's constructors and save_pretrained (cls is TokenFlexVLM)."""

    @classmethod
    def from_components(cls, vision_path: str | Path, lm_path: str | Path, projector: str = "adaptive_pool_swiglu",
                        projector_options: dict | None = None, vision_feature_layer: int = -2,
                        attn_implementation: str = "sdpa", chat_format: str = "auto") -> Self:
        """How users start: a vision checkpoint folder plus an LM checkpoint folder, in fp32
        whatever dtype the checkpoints were saved in. Under ZeRO-3 loading (stages/align.py) the
        tower and the LM are created by zero.Init instead, partitioned and in the run's dtype,
        while the projector is not: training casts it (pipeline/engine/engine.py: cast_parameters)."""
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
                    attn_implementation: str = "sdpa", dtype: str | torch.dtype = torch.float32) -> Self:
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
                        dtype: str | torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> Self:
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

    def _is_tied(self, name: str) -> bool:
        return self.language_model.config.tie_word_embeddings and name.endswith("lm_head.weight")

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        write_model_folder(path, self.config, self.tokenizer, self.image_processor, self.state_dict(), max_shard_size)
