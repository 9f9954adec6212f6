"""Attention implementations: which the model accepts, whether this machine runs them, and what
flash-attention needs to keep packed samples apart.

Model folders carry this module as transformers remote code (see modeling_tokenflex.py).
"""

import importlib.util

import torch
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.utils import is_flash_attn_2_available

from .runtime import on_device

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
FLASH_ATTN_INSTALL = "pip install flash-attn --no-build-isolation"


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


def packed_sequences(position_ids: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor | int]:
    """flash-attention's variable-length arguments (transformers' FlashAttentionKwargs) for rows laid
    end to end, (1, total) position ids restarting at 0 per sequence: the sequences' cumulative
    lengths, on device, and the longest one's length, as an int."""
    (starts, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    starts, longest = on_device(starts, device), int(longest)
    return {"cu_seq_lens_q": starts, "cu_seq_lens_k": starts, "max_length_q": longest, "max_length_k": longest}
