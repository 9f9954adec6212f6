"""LoRA adapters (peft) for stage 2, model.lora: which layers get them, adding them to a model, the
start-up checks that name the key, and the record (checkpoints/model/lora.json) from which conversion
rebuilds the adapted model to merge its adapters or keep them apart.

One peft injection into the whole VLM, with one regex over both parts' layer names, so the parameter
names in checkpoints (language_model...q_proj.lora_A.default.weight) are those of a peft adapter
folder over the VLM (pipeline/export/convert.py writes one with --adapters).

Order under ZeRO-3: stages/finetune.py loads the model folder straight into partitions first, then
adds the adapters here. That is safe because peft 0.21 reads each target's sizes from nn.Linear's
in_features and out_features (tuners_utils._get_in_out_features), never from its weight's shape,
which ZeRO-3 has emptied; its default initialization does not read the base weight; and it creates
the adapter weights as ordinary tensors, then moves them to the device and dtype of the base weight
(_move_adapter_to_device_of_base_layer), which ZeRO's placeholder keeps: the rank's GPU and the
run's dtype (bf16 on GPU). deepspeed.initialize then partitions them from rank 0's values, as it
does the projector, keeping fp32 master copies, and build_engine checks that every tensor lies on
the engine's device. Adding them before the load would need peft inside zero.Init and the folder's
weights renamed to peft's base_layer names: nothing gained.
"""

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from pipeline.model.folder import read_vlm_config
from pipeline.model.vlm import TokenFlexVLM
from pipeline.run.config import Config, LoraConfig

log = logging.getLogger("tokenflex")

ADAPTER = "default"  # peft's adapter name; it is part of every adapter parameter's name
RECORD = "lora.json"
KEYS = {"language_model": "model.lora.target_modules", "vision_tower": "model.lora.vision_target_modules"}


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (peft names them lora_A, lora_B)."""
    return peft.LoraModel.prefix in name


def targets(lora: LoraConfig) -> dict[str, list[str]]:
    """Each part that gets adapters, with the names of its linear layers that do."""
    return {"language_model": lora.target_modules} | ({"vision_tower": lora.vision_target_modules} if lora.vision
                                                      else {})


def target_pattern(part: str, names: list[str]) -> str:
    """peft's target_modules regex for a part, matched against the VLM's module names: the named linear
    layers inside the part's transformer layers (...layers.<i>...), not elsewhere (SigLIP's pooling head,
    whose output the VLM never reads, has an fc1 and fc2 too)."""
    return rf"{part}\.(.*\.)?layers\.\d+\.(.*\.)?({'|'.join(map(re.escape, names))})"


def peft_config(lora: LoraConfig, modules_to_save: list[str] | None = None) -> peft.LoraConfig:
    """The peft config of model.lora. modules_to_save: parts saved whole beside the adapters (an adapter folder's)."""
    pattern = "|".join(target_pattern(part, names) for part, names in targets(lora).items())
    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern,
                           modules_to_save=modules_to_save)


def layer_linears(part: nn.Module) -> set[str]:
    """Names (the last component) of the linear layers inside a part's transformer layers."""
    return {name.rsplit(".", 1)[-1] for name, module in part.named_modules()
            if isinstance(module, nn.Linear) and re.search(r"(^|\.)layers\.\d+\.", name)}


def check_targets(model: nn.Module, lora: LoraConfig) -> None:
    """ValueError naming the key when a target name matches no linear layer in its part's transformer
    layers. model: anything with the VLM's language_model and vision_tower (built on the meta device)."""
    for part, names in targets(lora).items():
        present = layer_linears(getattr(model, part))
        missing = [name for name in names if name not in present]
        if missing:
            raise ValueError(f"{KEYS[part]}: {missing} match no linear layer in the transformer layers of the "
                             f"{part} ({type(getattr(model, part)).__name__}), whose linear layers are "
                             f"{sorted(present)}")


def add_adapters(model: TokenFlexVLM, lora: LoraConfig) -> peft.LoraModel:
    """Add model.lora's adapters to the model, in place (freshly initialized: lora_B zero, so the model
    computes what it did). Returns peft's tuner over it, whose merge_and_unload merges them."""
    check_targets(model, lora)
    tuner = peft.LoraModel(model, peft_config(lora), ADAPTER)
    if lora.vision:
        # The tower's first layers read patch embeddings of frozen weights from pixels, which need no
        # gradient; reentrant gradient checkpointing (train.gradient_checkpointing) passes none into a
        # segment whose inputs need none, so its adapters would never train. Gradients then also flow
        # through every tower layer, as pipeline/train/flops.py counts.
        model.vision_tower.enable_input_require_grads()
    log.info("LoRA adapters (rank %d, alpha %g, dropout %g) on %s", lora.rank, lora.alpha, lora.dropout,
             "; ".join(f"{part}: {', '.join(names)}" for part, names in targets(lora).items()))
    return tuner


def check_config(cfg: Config) -> None:
    """Start-up checks of model.lora, each naming its keys; the target names are checked against the
    model folder's recorded structure, built on the meta device (no weights: seconds, even at 7B)."""
    lora = cfg.model.lora
    if not lora.enabled:
        return
    if cfg.train.stage != "finetune":
        raise ValueError(f"model.lora.enabled=true trains adapters in stage 2 (train.stage=finetune); "
                         f"train.stage={cfg.train.stage} trains the projector alone: set model.lora.enabled=false")
    if lora.vision and cfg.optim.vision_lr == 0:
        raise ValueError("model.lora.vision=true puts adapters on the vision tower, but optim.vision_lr=0 freezes "
                         "it: set optim.vision_lr > 0 (its adapters' learning rate) or model.lora.vision=false")
    config = read_vlm_config(cfg.model.init_from)
    with torch.device("meta"):
        parts = nn.ModuleDict({
            "language_model": AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.text_config)),
            "vision_tower": AutoModel.from_config(AutoConfig.for_model(**config.vision_config))})
    check_targets(parts, lora)


# ---- the record conversion reads ----

@dataclass
class AdapterRecord:
    """What a LoRA run's checkpoints/model/lora.json records, for conversion."""

    lora: LoraConfig
    base: str  # the model folder the run started from (model.init_from), absolute
    trained_whole: list[str]  # the top-level parts whose every weight trained (the projector, ...)


def record_adapters(folder: str | Path, model: TokenFlexVLM, cfg: Config) -> None:
    """Write lora.json into a checkpoints' model structure folder when the run trains adapters, and
    remove a stale one otherwise: the file is there exactly when the checkpoints hold adapters."""
    path = Path(folder) / RECORD
    if not cfg.model.lora.enabled:
        path.unlink(missing_ok=True)
        return
    whole = [name for name, part in model.named_children() if all(p.requires_grad for p in part.parameters())]
    record = AdapterRecord(cfg.model.lora, str(Path(cfg.model.init_from).resolve()), whole)
    path.write_text(json.dumps(asdict(record), indent=2))


def read_record(folder: str | Path) -> AdapterRecord | None:
    """The adapters a checkpoints' model structure folder records, or None when it holds none."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return AdapterRecord(LoraConfig(**raw["lora"]), raw["base"], raw["trained_whole"])


def check_resume(folder: str | Path, cfg: Config, checkpoint: Path) -> None:
    """ValueError unless a resumed run keeps the adapters its checkpoint was trained with (model.lora)."""
    record = read_record(folder)
    recorded = asdict(record.lora) if record else None
    wanted = asdict(cfg.model.lora) if cfg.model.lora.enabled else None
    if recorded != wanted:
        raise ValueError(f"model.lora: checkpoint {checkpoint} was trained with {recorded or 'no LoRA adapters'}, "
                         f"this config has {wanted or 'none'}; a resume must keep model.lora (or convert the "
                         f"checkpoint and start a new run from it: model.init_from)")
