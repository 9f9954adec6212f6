"""Models built straight into ZeRO-3 partitions: no rank ever holds a whole checkpoint.

Stage 1 builds its tower and LM with transformers' from_pretrained under zero3_loading; stage 2
(and any start from a model folder) with load_model_folder.
"""

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.utils import is_zero_param
from safetensors import safe_open
from transformers import AutoImageProcessor
from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

from pipeline.engine.engine import deepspeed_config, training_dtype
from pipeline.model.chat import load_tokenizer
from pipeline.model.folder import read_vlm_config, weight_files
from pipeline.model.vlm import TokenFlexVLM
from pipeline.run.config import Config

log = logging.getLogger("tokenflex")


@contextlib.contextmanager
def zero3_loading(cfg: Config) -> Iterator[None]:
    """Under ZeRO-3, make transformers' from_pretrained partition weights as it loads them
    (its HfDeepSpeedConfig hook), so no rank ever holds a whole HF checkpoint. They are created
    in the run's dtype; modules built outside (the projector) are cast by build_engine."""
    ds = deepspeed_config(cfg)
    if ds.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    hf_config = HfDeepSpeedConfig(ds)  # transformers holds it only weakly
    set_hf_deepspeed_config(hf_config)
    log.info("ZeRO-3: checkpoints load straight into partitioned parameters")
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def load_model_folder(path: str | Path, cfg: Config) -> TokenFlexVLM:
    """The model folder at path, to train from. Under ZeRO-3 it loads as stage 1's checkpoints do:
    transformers builds the vision tower and the LM straight into partitions (zero.Init) and
    load_partitioned_weights fills them, so no rank ever holds the whole model; the projector and
    tile layout, small, are built whole and partitioned by DeepSpeed. Otherwise the whole model, in fp32."""
    with zero3_loading(cfg):
        if not is_deepspeed_zero3_enabled():
            return TokenFlexVLM.from_pretrained(path, attn_implementation=cfg.model.attn_implementation)
        model = TokenFlexVLM.from_config(read_vlm_config(path), load_tokenizer(path),
                                         AutoImageProcessor.from_pretrained(path), cfg.model.attn_implementation,
                                         training_dtype(cfg.train.precision))
    load_partitioned_weights(model, path)
    return model


def load_partitioned_weights(model: TokenFlexVLM, path: str | Path) -> None:
    """The folder's weights into a model whose parameters ZeRO-3 partitions: rank 0 reads each
    tensor (memory-mapped, one at a time) into its gathered parameter, which DeepSpeed then
    partitions to every rank; every rank reads the tensors of what ZeRO does not hold (yet)."""
    targets = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    loaded, unexpected = set(), set()
    for file in weight_files(path):
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                target = targets.get(name)
                if target is None:
                    unexpected.add(name)
                    continue
                with torch.no_grad(), deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    if dist.get_rank() == 0 or not is_zero_param(target):
                        target.copy_(weights.get_tensor(name))
                loaded.add(name)
    model.check_loaded_keys(path, set(dict(model.named_parameters())) - loaded, unexpected)
