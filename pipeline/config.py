"""Typed run configuration: dataclasses loaded from YAML plus dotted command-line overrides.

Every key is checked against the dataclasses, so a typo or a value of the wrong type is an
error that names the key instead of a silently ignored setting.
"""

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.chat import CHAT_FORMATS
from pipeline.model import ATTN_IMPLEMENTATIONS
from pipeline.projector import square_side

T = typing.TypeVar("T")


@dataclass
class ModelConfig:
    """Stage 1 assembles the VLM from `vision_path` + `lm_path`; stage 2 starts from `init_from`,
    a converted model folder (stage 1 writes one to <output_dir>/final).

    vision_feature_layer: which of the vision tower's hidden states feeds the projector; -2, the
        second-to-last layer's output, as LLaVA-1.5 (and Prismatic) use; -1 is the last layer.
    chat_format: the conversation format (pipeline/chat.py): auto picks the LM family's own
        (chatml for Qwen2, llama3 for Llama 3, plain for a base LM without a chat template) and
        keeps the one a model folder was saved with; or chatml, llama3, plain.
    """

    vision_path: str = ""
    lm_path: str = ""
    init_from: str = ""
    projector: str = "adaptive_pool_swiglu"
    projector_options: dict = field(default_factory=dict)
    vision_feature_layer: int = -2
    chat_format: str = "auto"
    # sdpa, eager, or flash_attention_2 (needs the flash-attn package and a GPU): attention of
    # the LM, and of the vision tower where its class supports it
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        if self.chat_format not in CHAT_FORMATS:
            raise ValueError(f"model.chat_format must be one of {list(CHAT_FORMATS)}, got {self.chat_format!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                             f"got {self.attn_implementation!r}")


@dataclass
class DataConfig:
    """What the training data is and how it is packed (pipeline/data/, pipeline/packing.py).

    shards: what to train on. A mixture file (.yaml, see pipeline/data/mixture.py) lists sources,
        each a shard folder with a name and either a repeat count (exact epochs; a fraction takes a
        seeded share of the source each epoch) or a weight (proportional sampling, endless);
        tools.build_mixture writes one from a LLaVA-OneVision-style YAML. A shard folder (with
        manifest.json, from tools.build_shards) or a brace pattern such as
        "data/shard-{000000..000009}.tar" is a mixture of one source, read once per epoch.
    seq_len: length of every packed row, in tokens (image slots included).
    rows_per_batch: packed rows per micro-batch.
    max_tiles: tiles per image at most (pipeline/tiles.py): each image is cut into the grid of at
        most max_tiles tiles at the tower's input size whose aspect ratio is closest to its own
        (InternVL's rule), plus a thumbnail when the grid has more than one; every tile is pooled
        to the step's N. 1: one tile per image, no thumbnail (the image at the tower's size).
    multi_image_max_tiles: tiles per image at most in samples with several images (at most
        max_tiles; LLaVA-OneVision gives each image of a multi-image sample one).
    text_tokens_per_image: text tokens per tile (per image when max_tiles is 1): sizes the tile
        budget per batch, ceil(rows_per_batch * seq_len / (N + text_tokens_per_image)) tiles, the
        same on every rank for a given N. auto: measured on the data (text tokens and row ends
        over tiles, in the first samples of up to 16 evenly spread shards, tokenized and tiled as
        training does), so that few tile slots go to dummy tiles.
    image_aspect: pad (to a square in the image processor's mean colour, then resize: LLaVA-1.5's
        default) or resize (straight to the processor's size). Recorded in model folders, so
        evaluation and generation prepare images the same way.
    shuffle_buffer: samples in each worker's shuffle buffer (0 or 1: no shuffling).
    num_workers: DataLoader worker processes per rank (0: read in the main process). Every epoch
        is cut into ranks x max(1, num_workers) equal slices, one per worker.
    seed: seeds each epoch's order of shards and sources and the shuffling.
    pack_window: pending samples the packer chooses each row's fill from.
    read_timeout_s: a loader worker that delivers nothing for this long ends the run with an
        error naming the rank, the worker and the shard it was reading (with num_workers >= 1).
    """

    shards: str = ""
    seq_len: int = 2048
    rows_per_batch: int = 1
    max_tiles: int = 1
    multi_image_max_tiles: int = 1
    text_tokens_per_image: int | str = "auto"
    image_aspect: str = "pad"
    shuffle_buffer: int = 256
    num_workers: int = 2
    seed: int = 0
    pack_window: int = 64
    read_timeout_s: float = 600.0

    def __post_init__(self):
        # An empty `shards` is allowed here (the config's defaults must construct); it fails on use.
        if not isinstance(self.shards, str):
            raise ValueError(f"data.shards must be a mixture file, shard folder or brace pattern, got {self.shards!r}")
        for name, low in [("seq_len", 8), ("rows_per_batch", 1), ("max_tiles", 1), ("multi_image_max_tiles", 1),
                          ("shuffle_buffer", 0), ("num_workers", 0),
                          ("seed", 0), ("pack_window", 1)]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{name} must be an integer >= {low}, got {value!r}")
        tokens = self.text_tokens_per_image
        if tokens != "auto" and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0):
            raise ValueError(f"data.text_tokens_per_image must be auto or an integer >= 0, got {tokens!r}")
        if self.image_aspect not in ("pad", "resize"):
            raise ValueError(f"data.image_aspect must be pad or resize, got {self.image_aspect!r}")
        if self.read_timeout_s <= 0:
            raise ValueError(f"data.read_timeout_s must be > 0, got {self.read_timeout_s}")


@dataclass
class TokensConfig:
    """Vision-token counts N drawn per optimizer step, with weights. One entry = fixed-N baseline.

    A resumed run must keep the counts and seed of its checkpoint (it would draw other N from
    there on) unless allow_change_on_resume is true."""

    counts: dict = field(default_factory=lambda: {64: 1.0, 144: 1.0, 256: 1.0})
    seed: int = 0
    allow_change_on_resume: bool = False

    def __post_init__(self):
        if not self.counts:
            raise ValueError("tokens.counts must name at least one token count")
        for count, weight in self.counts.items():
            if not isinstance(count, int) or count <= 0 or not isinstance(weight, (int, float)) or weight <= 0:
                raise ValueError(f"tokens.counts: {count}: {weight} must be a positive int count with a positive weight")
            square_side(count, "tokens.counts entry")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    vision_lr: float = 0.0  # > 0 trains the vision tower in stage 2, at this learning rate
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class TrainConfig:
    stage: str = "align"  # align (stage 1) or finetune (stage 2)
    output_dir: str = "runs/stage1"
    max_steps: int = 1000
    grad_accum: int = 1
    save_every: int = 500
    keep_last: int = 2
    deepspeed: str = "configs/zero3.json"
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0
    peak_tflops: float = 989.0  # per GPU, for MFU (H100 SXM dense bf16)
    export_final: bool = True  # write <output_dir>/final, a model folder, when training ends
    gradient_checkpointing: bool = False  # recompute LM (and trained tower) activations in backward
    # token: every supervised token of the step weighs the same; square: InternVL's reduction, each
    # token weighted by 1/sqrt(its sample's supervised tokens) (pipeline.model.supervised_weights)
    loss_reduction: str = "token"
    log_every: int = 10  # steps between metric lines in the log (the progress bar updates every step)
    # A rank waiting this long in one collective (a peer hung, not crashed) fails the job. Covers the
    # slowest collective wait: every rank saving its share of a checkpoint to a shared file system.
    collective_timeout_minutes: float = 30.0

    def __post_init__(self):
        if self.stage not in ("align", "finetune"):
            raise ValueError(f"train.stage must be 'align' or 'finetune', got {self.stage!r}")
        if self.loss_reduction not in ("token", "square"):
            raise ValueError(f"train.loss_reduction must be token or square, got {self.loss_reduction!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision must be auto, bf16 or fp32, got {self.precision!r}")
        for name in ("max_steps", "grad_accum", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.collective_timeout_minutes <= 0:
            raise ValueError(f"train.collective_timeout_minutes must be > 0, got {self.collective_timeout_minutes}")


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline, online or disabled
    project: str = "tokenflex"
    entity: str = ""
    name: str = ""

    def __post_init__(self):
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb.mode must be offline, online or disabled, got {self.mode!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def build(cls: type[T], values: object, prefix: str = "") -> T:
    """Make dataclass `cls` from a dict, naming the dotted key of anything unknown or mistyped."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}; {prefix.rstrip('.') or 'config'} has {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = check_type(value, kind, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"bad config value: {error}") from None


def check_type(value: object, kind: type | types.UnionType, key: str) -> object:
    if kind is float and not isinstance(value, bool):
        try:  # YAML reads 1e-3 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    expected = typing.get_args(kind) if isinstance(kind, types.UnionType) else (typing.get_origin(kind) or kind,)
    if isinstance(value, expected) and (bool in expected or not isinstance(value, bool)):
        return value
    raise ValueError(f"config key {key} must be {' or '.join(t.__name__ for t in expected)}, got {value!r}")


def set_dotted(values: dict, key: str, value: object) -> None:
    node = values
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key}: {part} is not a section")
    node[leaf] = value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """YAML file, then `section.key=value` overrides (values parsed as YAML: 3, 1e-4, true, {64: 1})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    values = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} must look like section.key=value")
        set_dotted(values, key.strip(), yaml.safe_load(raw))
    return build(Config, values)


def describe_options(cls: type = Config, prefix: str = "") -> list[str]:
    """Lines 'section.key (default: value)' for --help."""
    lines = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            lines += describe_options(f.type, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  {prefix}{f.name} (default: {default!r})")
    return lines


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
