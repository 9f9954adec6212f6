"""The TokenFLEX VLM: HF vision tower -> token-adaptive projector -> HF causal LM.

The vision tower always sees the full image; the step's token count N only changes how far
the projector pools and how many slots each image marker takes in the text.
"""

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub import load_torch_model, save_torch_state_dict
from torch import nn
from torch.nn import functional as F
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
)
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import ModelOutput

# relative imports: model folders carry this module as transformers remote code (modeling_tokenflex.py)
from .projector import build_projector
from .tokens import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    expand_image_markers,
    load_tokenizer,
)

MODEL_TYPE = "tokenflex_vlm"
REMOTE_CODE = Path(__file__).with_name("modeling_tokenflex.py")
AUTO_MAP = {"AutoConfig": "modeling_tokenflex.TokenFlexConfig", "AutoModel": "modeling_tokenflex.TokenFlexModel",
            "AutoModelForImageTextToText": "modeling_tokenflex.TokenFlexModel"}


@dataclass
class VLMConfig:
    """What a saved VLM folder records about its own structure (config.json)."""

    vision_config: dict
    text_config: dict
    projector: str = "adaptive_pool_swiglu"
    projector_options: dict = field(default_factory=dict)
    vision_feature_layer: int = -1
    image_token_id: int = -1
    model_type: str = MODEL_TYPE


@dataclass
class VLMOutput(ModelOutput):
    """A dict underneath, so ZeRO-3's hooks see the tensors in it."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def load_vision_tower(path):
    """Any HF vision encoder with a square patch grid; a full SigLIP (text+vision) folder works too."""
    config = AutoConfig.from_pretrained(path)
    vision_config = getattr(config, "vision_config", config)
    tower_class = MODEL_MAPPING[type(vision_config)] if vision_config is not config else AutoModel
    return tower_class.from_pretrained(path)


class TokenFlexVLM(nn.Module):
    def __init__(self, config: VLMConfig, vision_tower, language_model, tokenizer, image_processor):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.language_model = language_model
        self.projector = build_projector(
            config.projector,
            vision_tower.config.hidden_size,
            language_model.config.hidden_size,
            **config.projector_options,
        )
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    # ---- construction and persistence ----

    @classmethod
    def from_components(cls, vision_path, lm_path, projector="adaptive_pool_swiglu", projector_options=None,
                        vision_feature_layer=-1):
        """How users start: a vision checkpoint folder plus an LM checkpoint folder."""
        vision_tower = load_vision_tower(vision_path)
        language_model = AutoModelForCausalLM.from_pretrained(lm_path)
        tokenizer = load_tokenizer(lm_path)
        if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
            language_model.resize_token_embeddings(len(tokenizer))
        config = VLMConfig(
            vision_config=vision_tower.config.to_dict(),
            text_config=language_model.config.to_dict(),
            projector=projector,
            projector_options=dict(projector_options or {}),
            vision_feature_layer=vision_feature_layer,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        )
        return cls(config, vision_tower, language_model, tokenizer, AutoImageProcessor.from_pretrained(vision_path))

    @classmethod
    def from_config(cls, config: VLMConfig, tokenizer, image_processor):
        """Random-init modules of the recorded shapes; weights are loaded afterwards."""
        vision_config = AutoConfig.for_model(**config.vision_config)
        text_config = AutoConfig.for_model(**config.text_config)
        return cls(config, AutoModel.from_config(vision_config), AutoModelForCausalLM.from_config(text_config),
                   tokenizer, image_processor)

    @classmethod
    def from_pretrained(cls, path):
        path = Path(path)
        config = read_vlm_config(path)
        model = cls.from_config(config, load_tokenizer(path), AutoImageProcessor.from_pretrained(path))
        model.load_weights(path)
        return model

    def load_weights(self, path):
        # strict=False because tied embeddings are stored once; anything else missing is an error
        result = load_torch_model(self, path, strict=False)
        tied = {name for name in result.missing_keys if self._is_tied(name)}
        missing = sorted(set(result.missing_keys) - tied)
        if missing or result.unexpected_keys:
            raise ValueError(f"{path}: weights do not match the model: missing {missing[:5]}, "
                             f"unexpected {sorted(result.unexpected_keys)[:5]}")
        self.language_model.tie_weights()

    def _is_tied(self, name):
        return self.language_model.config.tie_word_embeddings and name.endswith("lm_head.weight")

    def save_pretrained(self, path, max_shard_size="5GB"):
        write_model_folder(path, self.config, self.tokenizer, self.image_processor, self.state_dict(), max_shard_size)

    def generation_config(self, **options):
        return generation_config(self.tokenizer, **options)

    # ---- forward ----

    def encode_images(self, pixel_values, num_vision_tokens):
        """(images, 3, H, W) -> (images, N, lm_dim)."""
        dtype = next(self.projector.parameters()).dtype
        out = self.vision_tower(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.config.vision_feature_layer]
        return self.projector(features, num_vision_tokens)

    def embed(self, input_ids, pixel_values, image_mask, num_vision_tokens):
        """Token embeddings with each image's N projected features written into its N slots.

        The vision path runs even when the batch has no real image (all-dummy pixels): under
        ZeRO-3 every rank must run the same module forwards, or the job hangs.
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        features = self.encode_images(pixel_values, num_vision_tokens)
        real = features[image_mask].reshape(-1, embeds.shape[-1])
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != real.shape[0]:
            raise ValueError(
                f"batch has {int(slots.sum())} image slots but {int(image_mask.sum())} images x "
                f"N={num_vision_tokens} = {real.shape[0]} image features; each image marker must "
                f"be expanded to N slots and match exactly one image"
            )
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), real.to(embeds.dtype))
        # dummy images contribute with zero weight, so their parameters still join backward
        return embeds + 0.0 * features[~image_mask].sum().to(embeds.dtype)

    def forward(self, batch, num_vision_tokens, return_logits=False):
        """batch: input_ids, labels, position_ids (rows, L); pixel_values (M, 3, H, W); image_mask (M,).

        Returns the mean cross-entropy over supervised tokens; logits only when asked, since
        full-vocabulary logits dominate memory at large N.
        """
        embeds = self.embed(batch["input_ids"], batch["pixel_values"], batch["image_mask"], num_vision_tokens)
        # use_cache=False matters: with a cache, transformers ignores the packed position ids and
        # lets packed samples attend to each other
        hidden = self.language_model.model(
            inputs_embeds=embeds, position_ids=batch.get("position_ids"),
            attention_mask=batch.get("attention_mask"), use_cache=False,
        ).last_hidden_state
        loss = None
        if "labels" in batch:
            loss = self.supervised_loss(hidden, batch["labels"])
        logits = self.language_model.lm_head(hidden) if return_logits else None
        return VLMOutput(loss=loss, logits=logits)

    def supervised_loss(self, hidden, labels):
        """Next-token cross-entropy computed only where a label exists.

        Image slots and prompts carry no label, so at large N most positions never get
        full-vocabulary logits: the fp32 logits that dominate memory in a plain HF loss shrink
        to the supervised rows. (A recomputed chunked loss does not survive ZeRO-3's
        parameter gathering inside backward, so this is the CPU/ZeRO-3 path.)
        """
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if not keep.any():
            # lm_head still runs: under ZeRO-3 every rank must run the same module forwards
            return self.language_model.lm_head(hidden[:, 0]).sum() * 0.0
        logits = self.language_model.lm_head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep])

    # ---- inference ----

    def prompt_ids(self, prompt, has_image):
        content = f"{IMAGE_TOKEN}\n{prompt}" if has_image else prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]

    def pixel_values(self, images):
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def image_inputs(self, pixel_values):
        """(pixel_values, image_mask) for a forward: the real images, or one masked-out dummy
        when there are none, since the vision path always runs (see embed)."""
        if pixel_values is not None and len(pixel_values):
            return pixel_values, torch.ones(len(pixel_values), dtype=torch.bool)
        size = self.image_processor.size
        return torch.zeros(1, 3, size["height"], size["width"]), torch.zeros(1, dtype=torch.bool)

    def prompt_embeddings(self, prompts_ids, pixel_values, image_mask, num_vision_tokens):
        """Left-padded embeddings and attention mask for tokenized prompts whose image markers
        are not yet expanded."""
        rows = [expand_image_markers(ids, ids, self.config.image_token_id, num_vision_tokens)[0]
                for ids in prompts_ids]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        device = next(self.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        embeds = self.embed(input_ids, pixel_values.to(device), image_mask.to(device), num_vision_tokens)
        return embeds, attention_mask

    def inference_inputs(self, images, prompts, num_vision_tokens):
        """prompt_embeddings for text prompts and PIL images; an image may be None (text-only)."""
        prompts_ids = [self.prompt_ids(prompt, image is not None) for image, prompt in zip(images, prompts, strict=True)]
        real_images = [image for image in images if image is not None]
        pixel_values, image_mask = self.image_inputs(self.pixel_values(real_images) if real_images else None)
        return self.prompt_embeddings(prompts_ids, pixel_values, image_mask, num_vision_tokens)

    @torch.no_grad()
    def generate(self, images, prompts, num_vision_tokens, max_new_tokens=32):
        """Greedy answers, one per prompt."""
        return self.generate_from(*self.inference_inputs(images, prompts, num_vision_tokens), max_new_tokens)

    @torch.no_grad()
    def generate_from(self, embeds, attention_mask, max_new_tokens):
        """Greedy answers from left-padded prompt embeddings (see prompt_embeddings)."""
        output = self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask,
            generation_config=self.generation_config(max_new_tokens=max_new_tokens),
        )
        return [a.strip() for a in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    @torch.no_grad()
    def timed_prefill(self, make_inputs):
        """(embeds, attention_mask, seconds): make_inputs() (vision encoding and prompt embeddings)
        plus the prompt forward, the part that N changes; synchronized on GPU."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        embeds, attention_mask = make_inputs()
        self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return embeds, attention_mask, time.perf_counter() - started

    def prefill_seconds(self, images, prompts, num_vision_tokens):
        return self.timed_prefill(lambda: self.inference_inputs(images, prompts, num_vision_tokens))[2]


def generation_config(tokenizer, **options):
    return GenerationConfig(do_sample=False, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                            pad_token_id=tokenizer.pad_token_id, **options)


def write_model_folder(path, config, tokenizer, image_processor, state_dict=None, max_shard_size="5GB"):
    """A model folder: config.json, tokenizer, image processor, generation config, the remote
    code through which plain transformers loads it (see modeling_tokenflex.py) and, when
    given, the weights as sharded safetensors. Without weights it records what a ZeRO
    checkpoint cannot: the structure to convert that checkpoint back into a model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(asdict(config) | {"auto_map": AUTO_MAP}, indent=2, default=str))
    for module in [REMOTE_CODE, *get_relative_import_files(REMOTE_CODE)]:
        shutil.copy(module, path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    generation_config(tokenizer).save_pretrained(path)
    if state_dict is not None:
        tied = config.text_config.get("tie_word_embeddings", False)
        weights = {k: v for k, v in state_dict.items() if not (tied and k.endswith("lm_head.weight"))}
        save_torch_state_dict(weights, path, max_shard_size=max_shard_size)


def read_vlm_config(path):
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a saved TokenFLEX model folder")
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{config_file} has model_type {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
    raw.pop("auto_map", None)  # for transformers' Auto classes
    return VLMConfig(**raw)
