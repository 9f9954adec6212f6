"""Training stages: what each trains, from what it starts. `STAGES[name]` is the contract
the engine uses: required_paths(cfg), vision_config(cfg) (the tower's config as a dict, read
without loading weights), build_model(cfg), freeze_backbones(model, cfg), param_groups(model, cfg).
common.py holds what they share; lora.py, stage 2's LoRA adapters (model.lora)."""

from stages import align, finetune

STAGES = {"align": align, "finetune": finetune}
