"""Training stages: what each trains, from what it starts. `STAGES[name]` is the contract
the engine uses: required_paths(cfg), build_model(cfg), freeze_backbones(model, cfg),
param_groups(model, cfg)."""

from stages import align, finetune

STAGES = {"align": align, "finetune": finetune}
