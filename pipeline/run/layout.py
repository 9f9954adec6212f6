"""Where a training run keeps its checkpoints, as training writes them and conversion reads them.

Layout under <output_dir>/checkpoints:
    model/              the model's structure (config, tokenizer, image processor), no weights
    step-000100/        DeepSpeed's files, plus trainer_state.json, mixture.json (the data's
                        sources, sizes and shares) and rank-<r>.pt (data position + RNG)
    step-000100-universal/  DeepSpeed's universal form of step-000100, made when a run resumes
                        it with a different number of ranks; pruned together with step-000100
    step-000100-universal.failed  the error of a failed conversion; delete it to try again
    latest              the tag of the newest complete checkpoint, replaced atomically
"""

import json
from pathlib import Path


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_tags(ckpt_dir: str | Path) -> list[str]:
    """Tags of the checkpoints in ckpt_dir, oldest first: step-000100, not step-000100-universal
    (a resume's conversion for another world size)."""
    return sorted(p.name for p in Path(ckpt_dir).glob("step-*") if p.name.removeprefix("step-").isdigit())


def latest_tag(ckpt_dir: str | Path) -> str | None:
    pointer = Path(ckpt_dir) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def latest_trainer_state(ckpt_dir: str | Path) -> tuple[str, dict] | tuple[None, None]:
    """(tag, trainer_state) of the checkpoint `latest` names, or (None, None) when there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None, None
    state_file = Path(ckpt_dir) / tag / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} missing: checkpoint {tag} is incomplete; point `latest` at an older one")
    return tag, json.loads(state_file.read_text())


def universal_dir(checkpoint: str | Path) -> Path:
    return Path(f"{checkpoint}-universal")


def conversion_failure_file(checkpoint: str | Path) -> Path:
    return Path(f"{checkpoint}-universal.failed")
