"""Stage 2, finetune: train the projector and the LM, and the vision tower when
optim.vision_lr > 0 (at that learning rate).

Starts from model.init_from, a model folder: stage 1's <output_dir>/final, or any folder
written by tools.convert_checkpoint."""

from pipeline.engine.zero3 import load_model_folder
from pipeline.model.chat import prepare_tokenizer
from pipeline.model.folder import read_vlm_config
from pipeline.model.images import set_image_aspect
from pipeline.model.tiles import set_tiling
from stages.common import group, log, set_trainable


def required_paths(cfg):
    return {"model.init_from": cfg.model.init_from}  # e.g. runs/stage1/final


def vision_config(cfg):
    return read_vlm_config(cfg.model.init_from).vision_config


def build_model(cfg):
    model = load_model_folder(cfg.model.init_from, cfg)
    prepare_tokenizer(model.tokenizer, cfg.model.chat_format)  # auto keeps the folder's format
    set_image_aspect(model.image_processor, cfg.data.image_aspect)
    set_tiling(model.image_processor, cfg.data.max_tiles, cfg.data.multi_image_max_tiles)
    return model


def trainable_parts(cfg):
    return {"projector", "tile_layout", "language_model"} | ({"vision_tower"} if cfg.optim.vision_lr > 0 else set())


def freeze_backbones(model, cfg):
    log.info("stage finetune: %s", ", ".join(sorted(trainable_parts(cfg))))
    set_trainable(model, trainable_parts(cfg))


def param_groups(model, cfg):
    groups = group([*model.projector.parameters(), *model.tile_layout.parameters(), *model.language_model.parameters()],
                   cfg.optim.lr, cfg.optim.weight_decay)
    if cfg.optim.vision_lr > 0:
        groups += group(list(model.vision_tower.parameters()), cfg.optim.vision_lr, cfg.optim.weight_decay)
    return groups
