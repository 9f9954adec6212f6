"""Typed run configuration: dataclasses loaded from YAML plus dotted command-line overrides.

Every key is checked against the dataclasses, so a typo or a value of the wrong type is an
error that names the key instead of a silently ignored setting.
"""

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.model.attention import ATTN_IMPLEMENTATIONS
from pipeline.model.chat import CHAT_FORMATS
from pipeline.model.images import IMAGE_ASPECTS
from pipeline.model.loss import LOSS_REDUCTIONS
from pipeline.model.projector import square_side

T = typing.TypeVar("T")
PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class ModelConfig:
    """model: what the VLM is built from. Stage 1 assembles it from vision_path + lm_path; stage 2
    starts from init_from, a model folder (stage 1 writes one to <output_dir>/final)."""

    vision_path: str = ""
    """Stage 1: a vision checkpoint folder (SigLIP, or any HF vision encoder with a square patch grid)."""
    lm_path: str = ""
    """Stage 1: a causal LM checkpoint folder (Qwen2, Llama, ...) with its tokenizer."""
    init_from: str = ""
    """Stage 2: the model folder to start from (stage 1's <output_dir>/final, or tools.convert_checkpoint's)."""
    projector: str = "adaptive_pool_swiglu"
    """The projector, by name (pipeline/model/projector.py): adaptive_pool_swiglu (TokenFLEX's) or mlp2x_gelu."""
    projector_options: dict = field(default_factory=dict)
    """The projector's options, e.g. {pooling: resize_avg} (the TokenFLEX authors' pooling) or {hidden_dim: 4096}."""
    vision_feature_layer: int = -2
    """Which of the tower's hidden states feeds the projector: -2, the second-to-last layer's output (LLaVA-1.5's)."""
    chat_format: str = "auto"
    """The conversation format: auto (the LM family's own; a model folder's saved one), chatml, llama3 or plain."""
    attn_implementation: str = "sdpa"
    """Attention of the LM (and of the tower where its class supports it): sdpa, eager, or flash_attention_2
    (needs the flash-attn package, a GPU and bf16)."""

    def __post_init__(self):
        if self.chat_format not in CHAT_FORMATS:
            raise ValueError(f"model.chat_format must be one of {list(CHAT_FORMATS)}, got {self.chat_format!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                             f"got {self.attn_implementation!r}")


@dataclass
class DataConfig:
    """data: what the training data is and how it is packed (pipeline/data/)."""

    shards: str = ""
    """What to train on: a mixture file (.yaml: sources, each a shard folder with a name and a repeat count or
    a weight; tools.build_mixture writes one), a shard folder (tools.build_shards), or a brace pattern such as
    "data/shard-{000000..000009}.tar" (a mixture of one source, read once per epoch)."""
    seq_len: int = 2048
    """Length of every packed row, in tokens (image slots included)."""
    rows_per_batch: int = 1
    """Packed rows per micro-batch."""
    max_tiles: int = 1
    """Tiles per image at most: each image is cut into the grid of at most max_tiles tiles of the tower's size
    closest to its aspect ratio (InternVL's rule), plus a thumbnail when there are several. 1: the whole image."""
    multi_image_max_tiles: int = 1
    """Tiles per image at most in samples with several images (at most max_tiles)."""
    text_tokens_per_image: int | str = "auto"
    """Text tokens per tile, which size the tile budget per batch (rows_per_batch * seq_len / (N + this)): auto
    measures them on the data, so that few tile slots go to dummy tiles."""
    image_aspect: str = "pad"
    """pad (to a square in the processor's mean colour, then resize: LLaVA-1.5's) or resize (straight to the
    tower's size). Recorded in model folders, so evaluation and generation prepare images alike."""
    shuffle_buffer: int = 256
    """Samples in each worker's shuffle buffer (0 or 1: no shuffling)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the training process). Every epoch is cut into
    ranks x max(1, num_workers) equal slices, one per worker."""
    seed: int = 0
    """Seeds each epoch's order of shards and sources, and the shuffling."""
    pack_window: int = 64
    """Pending samples the packer chooses each row's fill from."""
    read_timeout_s: float = 600.0
    """A loader worker that delivers nothing for this long ends the run with an error naming the rank, the
    worker and the shard it was reading (with num_workers >= 1)."""

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
        if self.image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"data.image_aspect must be one of {', '.join(IMAGE_ASPECTS)}, got {self.image_aspect!r}")
        if self.read_timeout_s <= 0:
            raise ValueError(f"data.read_timeout_s must be > 0, got {self.read_timeout_s}")


@dataclass
class TokensConfig:
    """tokens: the vision-token counts N drawn per optimizer step, the same on every rank."""

    counts: dict = field(default_factory=lambda: {64: 1.0, 144: 1.0, 256: 1.0})
    """Each count N (a perfect square) with its weight; one entry trains at a fixed N."""
    seed: int = 0
    """Seeds the draw: N is a pure function of (seed, step)."""
    allow_change_on_resume: bool = False
    """Let a resumed run change counts or seed (it then draws other N from its checkpoint on)."""

    def __post_init__(self):
        if not self.counts:
            raise ValueError("tokens.counts must name at least one token count")
        for count, weight in self.counts.items():
            if not isinstance(count, int) or count <= 0 or not isinstance(weight, (int, float)) or weight <= 0:
                raise ValueError(
                    f"tokens.counts: {count}: {weight} must be a positive int count with a positive weight"
                )
            square_side(count, "tokens.counts entry")


@dataclass
class OptimConfig:
    """optim: AdamW and its schedule (linear warmup, then cosine decay)."""

    lr: float = 1e-3
    """Learning rate of the projector, the tile layout and (stage 2) the LM."""
    vision_lr: float = 0.0
    """Stage 2: > 0 trains the vision tower too, at this learning rate."""
    weight_decay: float = 0.0
    """AdamW's weight decay, on matrices only (norms and biases get none)."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's betas."""
    warmup_ratio: float = 0.03
    """The share of max_steps spent warming the learning rate up linearly."""
    min_lr_ratio: float = 0.0
    """Where the cosine decay ends, as a share of the learning rate."""
    grad_clip: float = 1.0
    """Clip the gradients' global norm to this (0: no clipping)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class TrainConfig:
    """train: the run itself."""

    stage: str = "align"
    """The stage to train (stages/): align (stage 1: the projector) or finetune (stage 2: projector and LM)."""
    output_dir: str = "runs/stage1"
    """Where checkpoints, metrics.jsonl, config.yaml and the final model folder go; a run resumes from it."""
    max_steps: int = 1000
    """Optimizer steps in all."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (all at the step's N)."""
    save_every: int = 500
    """Steps between checkpoints (one is also written at the end and on a stop signal)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted."""
    deepspeed: str = "configs/zero3.json"
    """The DeepSpeed config; its "auto" values are filled from this config."""
    precision: str = "auto"
    """auto (bf16 on a GPU, fp32 on CPU), bf16 or fp32: the weights' dtype (fp32 masters under bf16)."""
    seed: int = 0
    """Seeds Python, NumPy and torch on every rank."""
    peak_tflops: float = 989.0
    """Each GPU's peak, for MFU (989: H100 SXM, dense bf16)."""
    export_final: bool = True
    """Write <output_dir>/final, a model folder, when training ends."""
    gradient_checkpointing: bool = False
    """Recompute the LM's (and a trained tower's) activations in backward: less memory, more compute."""
    loss_reduction: str = "token"
    """token (every supervised token of the step weighs the same) or square (InternVL's: each token weighs
    1/sqrt(its sample's supervised tokens); pipeline.model.loss.supervised_weights)."""
    log_every: int = 10
    """Steps between metric lines in the log (the progress bar updates every step)."""
    collective_timeout_minutes: float = 30.0
    """A rank waiting this long in one collective (a peer hung, not crashed) fails the job; covers the slowest
    wait, every rank saving its share of a checkpoint to a shared file system."""

    def __post_init__(self):
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"train.loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, "
                             f"got {self.loss_reduction!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("max_steps", "grad_accum", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.collective_timeout_minutes <= 0:
            raise ValueError(f"train.collective_timeout_minutes must be > 0, got {self.collective_timeout_minutes}")


@dataclass
class WandbConfig:
    """wandb: where the metrics go besides metrics.jsonl."""

    mode: str = "offline"
    """offline (a local wandb folder in output_dir; `wandb sync` it later), online or disabled."""
    project: str = "tokenflex"
    """The wandb project."""
    entity: str = ""
    """The wandb entity (team or user; empty: your default)."""
    name: str = ""
    """The run's name (empty: wandb picks one)."""

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise ValueError(f"wandb.mode must be one of {', '.join(WANDB_MODES)}, got {self.mode!r}")


@dataclass
class Config:
    """A training run's configuration, section by section."""

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
        raise ValueError(
            f"unknown config key {prefix}{unknown[0]}; {prefix.rstrip('.') or 'config'} has {sorted(known)}"
        )
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
    """--help's lines: every key with its type, default and documentation (the string below its field)."""
    lines = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            lines += textwrap.wrap(f"{prefix}{f.name}: {field_docs_heading(f.type)}", width=100)
            lines += describe_options(f.type, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"  {prefix}{f.name} ({kind}, default {default!r})")
        lines += textwrap.wrap(docs.get(f.name, ""), width=100, initial_indent="      ", subsequent_indent="      ")
    return lines


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the string literal right below it in the class body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {field.target.id: " ".join(doc.value.value.split())
            for field, doc in zip(body, body[1:])
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}


def field_docs_heading(cls: type) -> str:
    """A section's one-line description: its class docstring after the section's name."""
    return " ".join((cls.__doc__ or "").split()).partition(": ")[2]


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
