"""ZeRO checkpoint -> model folder, with DeepSpeed's own consolidation utilities."""

from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoImageProcessor

from pipeline.checkpoint import latest_tag
from pipeline.model import read_vlm_config, write_model_folder
from pipeline.tokens import load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def convert_checkpoint(ckpt_dir, out_dir, tag=None, dtype="fp32"):
    """Gather every rank's fp32 shards (frozen weights included) into one state dict and write
    it with the structure recorded in <ckpt_dir>/model. Returns the state dict."""
    ckpt_dir = Path(ckpt_dir)
    structure = ckpt_dir / "model"
    tag = tag or latest_tag(ckpt_dir)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    state_dict = {k: v.to(DTYPES[dtype]) for k, v in state_dict.items()}
    write_model_folder(out_dir, read_vlm_config(structure), load_tokenizer(structure),
                       AutoImageProcessor.from_pretrained(structure), state_dict)
    return state_dict
