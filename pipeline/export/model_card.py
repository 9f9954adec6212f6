"""A model folder's README.md, the model card the Hugging Face hub shows: what the model is
made of, how it was trained and on what data, how to load it and, once tools.benchmark
--model-card has run on it, its evaluation table.

tools.convert_checkpoint (and so stage 1's final/) writes it from the folder's config.json and
the run's config.yaml; the base checkpoints are the `_name_or_path` that transformers records
in the vision and text configs, carried unchanged from stage 1 into stage 2.
"""

from pathlib import Path

from pipeline.model.folder import VLMConfig
from pipeline.run.config import Config, DataConfig
from stages import STAGES

EVALUATION_HEADING = "## Evaluation"


def write_model_card(folder: str | Path, config: VLMConfig, run_config: Config | None = None, step: int | None = None,
                     mixture: dict | None = None) -> None:
    """README.md in `folder` for a VLMConfig; run_config (a pipeline.run.config.Config), step and
    mixture (the checkpoint's mixture.json: pipeline.data.mixture.Mixture.manifest()) say how and
    on what it was trained when the folder comes from a training run."""
    folder = Path(folder)
    vision, text = config.vision_config, config.text_config
    side = vision["image_size"] // vision["patch_size"]
    rows = [("vision tower", base_model(vision)), ("language model", base_model(text)),
            ("projector", f"`{config.projector}`: pools the {side}×{side} patch grid to n×n, then maps into the LM")]
    if run_config is not None:
        counts = run_config.tokens.counts
        weights = ":".join(f"{w:g}" for w in counts.values())
        rows += [("stage", " ".join(STAGES[run_config.train.stage].__doc__.split("\n\n")[0].split())),
                 ("trained at N", f"{', '.join(map(str, counts))} (drawn per step, weights {weights})"),
                 ("images", images_row(run_config.data, vision["image_size"])),
                 ("steps", f"{step} of `{run_config.train.output_dir}`")]
    rows.append(("serves", f"any N = n² with n ≤ {side} (e.g. 16, 64, 144, 256)"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    data = f"\n{data_table(mixture)}" if mixture else ""
    (folder / "README.md").write_text(f"""\
---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [tokenflex, vision-language]
---

# {folder.name}

A [TokenFLEX](https://arxiv.org/abs/2504.03154) vision-language model: one model that answers
with any number of vision tokens N, chosen at inference.

| | |
|---|---|
{table}
{data}
## How to load it

With transformers alone (the folder carries its modeling code):

```python
from PIL import Image
from transformers import AutoModel

model = AutoModel.from_pretrained("{folder}", trust_remote_code=True, dtype="bfloat16", device_map="cuda:0")
image = Image.open("scene.png").convert("RGB")
print(model.generate([image], ["What is written on the sign?"], num_vision_tokens=64, max_new_tokens=32))
```

With the TokenFLEX training pipeline checked out: `TokenFlexVLM.from_pretrained("{folder}")`,
`python -m tools.generate {folder} --image scene.png --prompt "..." --tokens 16,64,256`, or
`python -m lmms_eval --model tokenflex --model_args pretrained={folder},num_vision_tokens=64 ...`.

{EVALUATION_HEADING}

None yet: `python -m tools.benchmark {folder} --tasks ... --model-card` writes it here.
""")


def images_row(data: DataConfig, side: int) -> str:
    """How the run prepared images (data.image_aspect, data.max_tiles): what serving does by default."""
    prepared = f"`{data.image_aspect}` to {side}×{side} px"
    if data.max_tiles == 1:
        return f"{prepared}, one tile each"
    return (f"tiles of {side}×{side} px: up to {data.max_tiles} per image ({data.multi_image_max_tiles} in samples "
            f"of several images) and a thumbnail ({prepared}), each pooled to N; serve with other limits through "
            f"`--tiles` or `num_tiles=`")


def data_table(mixture: dict) -> str:
    """The training data: each source's name, size and share of an epoch."""
    share = mixture["mode"]
    rows = "\n".join(f"| {s['name']} | {s['samples']} | {s[share]:g} | {s['samples_per_epoch']} |"
                     for s in mixture["sources"])
    return (f"## Training data\n\nA mixture of {len(mixture['sources'])} source(s) (shard folders from "
            f"tools.build_shards), {mixture['epoch_samples']} samples an epoch, data.seed {mixture['seed']}.\n\n"
            f"| source | samples | {share} | samples per epoch |\n|---|---|---|---|\n{rows}\n")


def base_model(sub_config: dict) -> str:
    """'Qwen2ForCausalLM from `Qwen/Qwen2-1.5B`' from a config dict transformers wrote."""
    architecture = ", ".join(sub_config.get("architectures") or [sub_config.get("model_type", "?")])
    source = sub_config.get("_name_or_path")
    return f"{architecture} from `{source}`" if source else architecture


def set_evaluation(folder: str | Path, table: str) -> None:
    """Replace the card's evaluation section with `table` (markdown); a folder without a card gets one with just it."""
    path = Path(folder) / "README.md"
    card = path.read_text() if path.exists() else f"# {Path(folder).name}\n"
    path.write_text(f"{card.split(EVALUATION_HEADING)[0].rstrip()}\n\n{EVALUATION_HEADING}\n\n{table}")
