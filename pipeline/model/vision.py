"""The image side of the VLM: the vision tower, and its patch features for the projector.

The tower's output does not depend on the token count N (only the projector's pooling does), so
an image's features can be computed once and projected at several N.
"""

from pathlib import Path

import torch
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig


def tower_attn_implementation(tower_class: type, requested: str) -> str | None:
    """requested when the vision tower's class supports it, else None (transformers' default):
    only the LM needs variable-length attention, for packed rows."""
    supported = {
        "eager": True,
        "sdpa": tower_class._supports_sdpa,
        "flash_attention_2": tower_class._supports_flash_attn,
    }
    return requested if supported[requested] else None


def load_vision_tower(path: str | Path, attn_implementation: str = "sdpa") -> nn.Module:
    """Any HF vision encoder with a square patch grid, in fp32; a full SigLIP (text+vision)
    folder works too."""
    config = AutoConfig.from_pretrained(path)
    tower_class = MODEL_MAPPING[type(getattr(config, "vision_config", config))]
    return tower_class.from_pretrained(
        path, attn_implementation=tower_attn_implementation(tower_class, attn_implementation), dtype=torch.float32
    )


def tower_features(vision_tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """(images, 3, H, W) pixels -> (images, patches, vision_dim): the hidden states of the
    tower's layer feature_layer (-2: the second-to-last layer's output, as LLaVA-1.5 uses)."""
    out = vision_tower(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[feature_layer]
