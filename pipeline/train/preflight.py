"""Checks before anything starts: every input a run needs, named by its config key."""

from pathlib import Path

from pipeline.data.mixture import load_mixture
from pipeline.engine.engine import use_bf16
from pipeline.model.attention import check_attn_implementation
from pipeline.model.projector import pooled_side
from pipeline.model.tiles import largest_image_slots
from pipeline.run.config import Config
from pipeline.run.layout import checkpoint_dir, latest_trainer_state
from pipeline.train.sampler import TokenCountSampler
from stages import STAGES

MIN_TEXT_TOKENS = 64  # room for a prompt and an answer beside an image, when text_tokens_per_image is auto


def check_inputs(cfg: Config) -> None:
    """Fail in seconds, naming the key, instead of after DeepSpeed and model start-up, or hours
    later when a bad token count is first drawn."""
    if cfg.train.stage not in STAGES:
        raise ValueError(f"train.stage must be one of {', '.join(STAGES)}, got {cfg.train.stage!r}")
    stage = STAGES[cfg.train.stage]
    paths = {**stage.required_paths(cfg), "train.deepspeed": cfg.train.deepspeed}
    for key, path in paths.items():
        if not path or not Path(path).exists():
            raise FileNotFoundError(f"{key}={path!r} not found (relative paths start at {Path.cwd()})")
    load_mixture(cfg.data.shards)
    if cfg.model.attn_implementation == "flash_attention_2" and not use_bf16(cfg.train.precision):
        raise ValueError(f"model.attn_implementation=flash_attention_2 needs bf16 weights (flash-attn has no fp32 "
                         f"kernels), but train.precision={cfg.train.precision} trains in fp32 here (auto: bf16 on a "
                         f"GPU, fp32 without one); set train.precision=bf16, or model.attn_implementation=sdpa")
    try:
        check_attn_implementation(cfg.model.attn_implementation)
    except ValueError as error:
        raise ValueError(f"model.attn_implementation: {error}") from None
    vision = stage.vision_config(cfg)
    grid = vision["image_size"] // vision["patch_size"]
    for count in cfg.tokens.counts:
        try:
            pooled_side(count, grid)
        except ValueError as error:
            raise ValueError(f"tokens.counts: {error}") from None
    # Room for a sample with the largest image data.max_tiles allows at the largest N: its slots
    # (pipeline/model/tiles.py) plus the text that data.text_tokens_per_image assumes per tile, or with
    # auto (measured later, on the data) a short prompt and answer. The packer can't cut a sample
    # inside its image.
    largest, text, max_tiles = max(cfg.tokens.counts), cfg.data.text_tokens_per_image, cfg.data.max_tiles
    text, named = (MIN_TEXT_TOKENS, "a minimum of text") if text == "auto" else (text, "data.text_tokens_per_image")
    image = largest_image_slots(max_tiles, largest)
    if cfg.data.seq_len < image + text:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} can't hold the largest image with its text at N={largest}: "
                         f"it must be at least the slots of an image of data.max_tiles={max_tiles} tiles at "
                         f"max(tokens.counts) + {named} = {image} + {text} = {image + text}")
    ckpt_dir = checkpoint_dir(cfg.train.output_dir)
    tag, trainer_state = latest_trainer_state(ckpt_dir)
    if tag and not cfg.tokens.allow_change_on_resume:
        TokenCountSampler(cfg.tokens.counts, cfg.tokens.seed).check_resumes(trainer_state["sampler"], ckpt_dir / tag)
