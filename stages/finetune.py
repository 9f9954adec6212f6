"""Stage 2, finetune: train the projector and the LM (or LoRA adapters on it, model.lora), and the
vision tower (or adapters on it) when optim.vision_lr > 0, each part at its own learning rate.

Starts from model.init_from, a model folder: stage 1's <output_dir>/final, or any folder
written by tools.convert_checkpoint."""

from pipeline.engine.zero3 import load_model_folder
from pipeline.model.chat import prepare_tokenizer
from pipeline.model.folder import read_vlm_config
from pipeline.model.images import set_image_aspect
from pipeline.model.tiles import set_tiling
from pipeline.model.video import set_video_sampling
from stages.common import group, log, projector_lr, set_trainable
from stages.lora import add_adapters


def required_paths(cfg):
    return {"model.init_from": cfg.model.init_from}  # e.g. runs/stage1/final


def vision_config(cfg):
    return read_vlm_config(cfg.model.init_from).vision_config


def build_model(cfg):
    model = load_model_folder(cfg.model.init_from, cfg)
    if cfg.model.lora.enabled:
        add_adapters(model, cfg.model.lora)  # after the load into ZeRO-3 partitions: stages/lora.py says why
    prepare_tokenizer(model.tokenizer, cfg.model.chat_format)  # auto keeps the folder's format
    set_image_aspect(model.image_processor, cfg.data.image_aspect)
    set_tiling(model.image_processor, cfg.data.max_tiles, cfg.data.multi_image_max_tiles)
    set_video_sampling(model.image_processor, cfg.data.video_frames, cfg.data.video_fps)
    return model


def trainable_parts(cfg):
    """The parts whose every weight trains; LoRA adapters, where added, train too (set_trainable)."""
    lora = cfg.model.lora
    parts = {"projector", "tile_layout"} | (set() if lora.enabled else {"language_model"})
    return parts | ({"vision_tower"} if cfg.optim.vision_lr > 0 and not (lora.enabled and lora.vision) else set())


def freeze_backbones(model, cfg):
    log.info("stage finetune: %s%s", ", ".join(sorted(trainable_parts(cfg))),
             " and LoRA adapters" if cfg.model.lora.enabled else "")
    set_trainable(model, trainable_parts(cfg))


def param_groups(model, cfg):
    """The projector and the tile layout at optim.projector_lr, the LM (or its adapters) at optim.lr, the
    tower (or its adapters) at optim.vision_lr; only what trains (group)."""
    optim = cfg.optim
    image_side = [*model.projector.parameters(), *model.tile_layout.parameters()]
    lm = list(model.language_model.parameters())
    if projector_lr(optim) == optim.lr:  # one group, as before per-part rates: their checkpoints still load
        groups = group(image_side + lm, optim.lr, optim.weight_decay)
    else:
        groups = group(image_side, projector_lr(optim), optim.weight_decay) + group(lm, optim.lr, optim.weight_decay)
    return groups + group(list(model.vision_tower.parameters()), optim.vision_lr, optim.weight_decay)
