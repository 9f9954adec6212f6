"""Stage 1, align: train the projector only; the vision tower and the LM stay frozen.

The tiles' row-end embedding (pipeline/model/tiles.py) is part of the image side and trains with the
projector. Starts from separate vision and LM checkpoints (model.vision_path, model.lm_path)."""

from transformers import AutoConfig

from pipeline.engine.zero3 import zero3_loading
from pipeline.model.images import set_image_aspect
from pipeline.model.tiles import set_tiling
from pipeline.model.vlm import TokenFlexVLM
from stages.common import group, log, set_trainable


def required_paths(cfg):
    return {"model.vision_path": cfg.model.vision_path, "model.lm_path": cfg.model.lm_path}


def vision_config(cfg):
    config = AutoConfig.from_pretrained(cfg.model.vision_path)
    return getattr(config, "vision_config", config).to_dict()  # a full SigLIP/CLIP folder holds a text half too


def build_model(cfg):
    with zero3_loading(cfg):
        model = TokenFlexVLM.from_components(
            cfg.model.vision_path, cfg.model.lm_path, projector=cfg.model.projector,
            projector_options=cfg.model.projector_options, vision_feature_layer=cfg.model.vision_feature_layer,
            attn_implementation=cfg.model.attn_implementation,
            chat_format=cfg.model.chat_format,
        )
    set_image_aspect(model.image_processor, cfg.data.image_aspect)
    set_tiling(model.image_processor, cfg.data.max_tiles, cfg.data.multi_image_max_tiles)
    return model


def freeze_backbones(model, cfg):
    log.info("stage align: projector (and the tiles' row-end embedding) only")
    set_trainable(model, {"projector", "tile_layout"})


def param_groups(model, cfg):
    return group(list(model.projector.parameters()) + list(model.tile_layout.parameters()), cfg.optim.lr,
                 cfg.optim.weight_decay)
