"""A model folder: what it records of the model's structure (config.json), and writing and reading it.

A folder holds config.json, the weights as sharded safetensors, the tokenizer, the image
processor, a generation config and the transformers remote code through which plain transformers
loads it (modeling_tokenflex.py and the modules it imports relatively). Model folders carry this
module as remote code too.
"""

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import save_torch_state_dict
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.dynamic_module_utils import get_relative_import_files

from .chat import end_token_ids
from .projector import pooled_side

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor

MODEL_TYPE = "tokenflex_vlm"
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
