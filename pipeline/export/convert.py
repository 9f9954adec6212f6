"""ZeRO checkpoint -> model folder, with DeepSpeed's own consolidation utilities.

The folder (config.json, model.safetensors or shards with an index, tokenizer, image
processor, generation config, transformers remote code and a README.md model card) loads
with TokenFlexVLM.from_pretrained, or transformers' AutoModel with trust_remote_code=True,
and is how trained weights leave a run: stage 1 writes it automatically to <output_dir>/final when it ends, and
stage 2's config names that folder as model.init_from. Any other checkpoint of a run converts
the same way (python -m tools.convert_checkpoint RUN_DIR OUT --tag step-000100).

verify_folder then checks that the written folder's logits on a fixed probe batch equal those
of a model built from the consolidated state dict itself: bitwise for fp32, within one bf16
step for bf16.
"""

import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor, PreTrainedTokenizerBase

from pipeline.export.model_card import write_model_card
from pipeline.model.chat import IMAGE_TOKEN, load_tokenizer, tokenize_record
from pipeline.model.folder import MODEL_TYPE, read_vlm_config, write_model_folder
from pipeline.model.runtime import as_dtype
from pipeline.model.tiles import prepare_images
from pipeline.model.vlm import TokenFlexVLM
from pipeline.run.config import Config, load_config
from pipeline.run.layout import checkpoint_tags, latest_tag

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor

class ConversionError(Exception):
    """A checkpoint that can't be converted; the message says what is wrong and what to do."""


def convert_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, tag: str | None = None,
                       dtype: str | torch.dtype = "fp32", max_shard_size: int | str = "5GB",
                       verify: bool = False) -> dict[str, torch.Tensor]:
    """Gather every rank's fp32 shards (frozen weights included) into one state dict and write
    it with the structure recorded in <ckpt_dir>/model. Returns the fp32 state dict.

    ckpt_dir: a run's checkpoints folder, the run's output_dir, or one step-XXXXXX folder.
    tag: which checkpoint (default: the one `latest` names). verify: see verify_folder; it
    builds two more copies of the model in memory.
    """
    try:
        dtype = as_dtype(dtype)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    ckpt_dir, tag = resolve_checkpoint(ckpt_dir, tag)
    structure = ckpt_dir / "model"
    try:
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except (OSError, RuntimeError, ValueError, KeyError, IndexError, EOFError, pickle.UnpicklingError) as exn:
        raise ConversionError(
            f"DeepSpeed could not consolidate checkpoint {ckpt_dir / tag}: {type(exn).__name__}: {exn}. "
            f"A file is probably corrupted or from a different run; convert an older checkpoint with --tag "
            f"({available_tags(ckpt_dir)})") from exn
    config = read_vlm_config(structure)
    write_model_folder(out_dir, config, load_tokenizer(structure), AutoImageProcessor.from_pretrained(structure),
                       {k: v.to(dtype) for k, v in state_dict.items()}, max_shard_size)
    write_model_card(out_dir, config, *run_record(ckpt_dir, tag))
    if verify:
        verify_folder(out_dir, structure, state_dict, dtype)
    return state_dict


def run_record(ckpt_dir: Path, tag: str) -> tuple[Config | None, int, dict | None]:
    """(the run's Config, the checkpoint's step, its data mixture's manifest) for the model card;
    the Config is None when the run's config.yaml is not beside its checkpoints folder, the
    manifest when the checkpoint has no mixture.json (written before it was recorded)."""
    step = json.loads((ckpt_dir / tag / "trainer_state.json").read_text())["step"]
    config_file, mixture_file = ckpt_dir.parent / "config.yaml", ckpt_dir / tag / "mixture.json"
    return ((load_config(config_file) if config_file.is_file() else None), step,
            (json.loads(mixture_file.read_text()) if mixture_file.is_file() else None))


# ---- finding and checking the checkpoint ----

def resolve_checkpoint(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints folder, tag) for a run dir, its checkpoints/ or a step folder; ConversionError
    naming the problem when the checkpoint is foreign, missing or incomplete."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a folder: give a run's output_dir or its checkpoints/ folder")
    if (path / "checkpoints" / "model").is_dir():
        path = path / "checkpoints"  # a run's output_dir
    elif not (path / "model").is_dir() and (path.parent / "model").is_dir() and tag is None:
        path, tag = path.parent, path.name  # one step-XXXXXX folder
    check_structure(path)
    if tag is None:
        tag = latest_tag(path)
        if tag is None:
            raise ConversionError(
                f"{path / 'latest'} is missing, so no checkpoint there is known to be complete (training writes it "
                f"after every rank has saved). Pass --tag to convert one anyway; {available_tags(path)}")
    if not (path / tag).is_dir():
        raise ConversionError(f"checkpoint {path / tag} does not exist; {available_tags(path)}")
    check_complete(path / tag)
    return path, tag


def check_structure(ckpt_dir: Path) -> None:
    """The model structure every TokenFLEX checkpoints folder holds in model/config.json."""
    config = ckpt_dir / "model" / "config.json"
    if not config.is_file():
        raise ConversionError(
            f"{ckpt_dir} is not a TokenFLEX checkpoints folder: {config} is missing. Give the output_dir of a "
            f"`python -m pipeline.train` run or its checkpoints/ folder")
    try:
        read_vlm_config(config.parent)
    except ValueError as exn:
        raise ConversionError(f"{ckpt_dir} holds a checkpoint from another project ({exn}); this tool converts "
                              f"{MODEL_TYPE} checkpoints written by pipeline.train") from exn


def available_tags(ckpt_dir: str | Path) -> str:
    """'available: step-000004, step-000008' for error messages."""
    return f"available: {', '.join(checkpoint_tags(ckpt_dir)) or 'none'}"


def check_complete(tag_dir: Path) -> None:
    """Every rank's files present (DeepSpeed expects one optimizer shard per rank, and under
    ZeRO-3 one model-state file per rank) and readable as torch zip archives."""
    state_file = tag_dir / "trainer_state.json"
    if not state_file.is_file():
        raise ConversionError(f"{state_file} is missing: checkpoint {tag_dir.name} is incomplete (training writes "
                              f"it after every rank has saved); convert an older one with --tag "
                              f"({available_tags(tag_dir.parent)})")
    world_size = json.loads(state_file.read_text())["world_size"]
    zero3 = any(tag_dir.glob("zero_pp_rank_*_model_states.pt"))
    expected = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)] if zero3 \
        else ["mp_rank_00_model_states.pt"]
    missing = [name for name in expected if not (tag_dir / name).is_file()]
    missing += [f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)
                if not list(tag_dir.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))]
    if missing:
        raise ConversionError(
            f"checkpoint {tag_dir} is incomplete: written by {world_size} ranks, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (one model-state and one optimizer file per rank). "
            f"Restore the file or convert an older checkpoint with --tag "
            f"({available_tags(tag_dir.parent)})")
    for file in sorted(tag_dir.glob("*_states.pt")):
        try:
            zipfile.ZipFile(file).close()  # reads the index at the end of the file: catches truncation
        except (zipfile.BadZipFile, OSError) as exn:
            raise ConversionError(f"{file} is truncated or corrupted ({exn}); the job probably died while saving. "
                                  f"Convert an older checkpoint with --tag "
                                  f"({available_tags(tag_dir.parent)})") from exn


# ---- verification ----

def probe_samples(tokenizer: PreTrainedTokenizerBase, image_processor: "BaseImageProcessor") -> list[dict]:
    """A fixed image question and a text-only one, tokenized as training tokenizes records."""
    size = image_processor.size
    image = Image.new("RGB", (size["width"], size["height"]), (40, 90, 200))
    ImageDraw.Draw(image).ellipse([size["width"] // 4, size["height"] // 4, size["width"] // 2, size["height"] // 2],
                                  fill=(230, 40, 40))
    records = [
        ({"conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat colour is the background?"},
                            {"from": "gpt", "value": "blue"}]}, image),
        ({"conversations": [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5"}]}, None),
    ]
    samples = []
    for record, image in records:
        input_ids, labels = tokenize_record(record, tokenizer, int(image is not None))
        pixels, grids = prepare_images([] if image is None else [image], image_processor)
        samples.append({"input_ids": input_ids, "labels": labels, "pixel_values": pixels, "image_grids": grids})
    return samples


@torch.no_grad()
def probe_logits(model: TokenFlexVLM) -> torch.Tensor:
    """Logits on the probe batch at the full patch grid's N, which every projector accepts."""
    model.eval()
    n = model.config.grid_side() ** 2
    batch = model.labelled_batch(probe_samples(model.tokenizer, model.image_processor), n)
    return model(batch, n, return_logits=True).logits


def verify_folder(out_dir: str | Path, structure: Path, state_dict: dict[str, torch.Tensor],
                  dtype: str | torch.dtype = "fp32") -> None:
    """ConversionError unless the written folder's probe logits equal those of a model built
    from the consolidated fp32 state dict (fp32: bitwise; bf16 and fp16: within one bf16 step)."""
    reference = TokenFlexVLM.from_config(read_vlm_config(structure), load_tokenizer(structure),
                                         AutoImageProcessor.from_pretrained(structure))
    reference.load_state_dict(state_dict)
    expected = probe_logits(reference)
    del reference
    actual = probe_logits(TokenFlexVLM.from_pretrained(out_dir))
    if as_dtype(dtype) == torch.float32:
        if not torch.equal(actual, expected):
            raise ConversionError(f"{out_dir}: logits differ from the checkpoint's by up to "
                                  f"{(actual - expected).abs().max():.3g}; the folder does not hold its weights")
        return
    try:
        torch.testing.assert_close(actual, expected, **bf16_tolerance(expected))
    except AssertionError as exn:
        raise ConversionError(f"{out_dir}: {as_dtype(dtype)} logits are further than one bf16 step from the "
                              f"checkpoint's: {exn}")


def bf16_tolerance(reference: torch.Tensor) -> dict[str, float]:
    """torch's bf16 rtol, and an atol of one bf16 step at the logits' largest magnitude (logits
    near zero carry rounding errors of that absolute size, not of their own)."""
    largest = float(reference.abs().max())
    step = torch.finfo(torch.bfloat16).eps * 2 ** math.floor(math.log2(largest)) if largest else 0.0
    return {"rtol": 1.6e-2, "atol": step}
