"""Inference helpers of TokenFlexVLM (a mixin): prompts in the LM's chat format, batches for a
forward, greedy generation and prefill timing, each landing on the model's device and dtype.

Model folders carry this module as transformers remote code (see pipeline/model.py).
"""

import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from .chat import IGNORE_INDEX, IMAGE_TOKEN, expand_image_markers
from .images import image_pixel_values

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name in DTYPES, its torch name (bfloat16, as lmms-eval's model_args
    give it), or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    by_torch_name = {str(d).removeprefix("torch."): d for d in DTYPES.values()}
    if dtype not in DTYPES and dtype not in by_torch_name:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join([*DTYPES, *by_torch_name])}")
    return DTYPES.get(dtype) or by_torch_name[dtype]


def inference_placement(device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) to run inference with: by default cuda when torch sees a GPU, else cpu;
    bf16 on a GPU, fp32 elsewhere."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"device {device!r}: {error}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device}: torch {torch.__version__} sees {torch.cuda.device_count()} CUDA GPU(s) here")
    return device, as_dtype(dtype or ("bf16" if device.type == "cuda" else "fp32"))


class InferenceMixin:
    """Methods TokenFlexVLM offers for evaluation, generation and benchmarks; they use its
    tokenizer, image_processor, config, embed, language_model and generation_config."""

    def prompt_ids(self, prompt: str, has_image: bool) -> list[int]:
        content = f"{IMAGE_TOKEN}\n{prompt}" if has_image else prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (images, 3, H, W) uint8 on the model's device (the forward normalizes them)."""
        return image_pixel_values(images, self.image_processor).to(self.device)

    def image_inputs(self, pixel_values: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values, image_mask) on the model's device for a forward: the given images (a list
        of (k, 3, H, W) uint8 tensors or None, e.g. one per sample), or one masked-out dummy when there
        are none, since the vision path always runs (see embed)."""
        present = [p for p in pixel_values if p is not None]
        if present:
            pixels = torch.cat(present).to(self.device)
            return pixels, torch.ones(len(pixels), dtype=torch.bool, device=self.device)
        size = self.image_processor.size
        return (torch.zeros(1, 3, size["height"], size["width"], device=self.device, dtype=torch.uint8),
                torch.zeros(1, dtype=torch.bool, device=self.device))

    def labelled_batch(self, samples: Sequence[dict], num_vision_tokens: int) -> dict[str, torch.Tensor]:
        """A forward batch as training builds one (markers expanded to N slots, per-sequence
        position_ids, real images flagged in image_mask), one sample per right-padded row, on
        the model's device.

        samples: dicts with input_ids, labels and pixel_values ((1, 3, H, W) or None). Right
        padding needs no attention mask: under causal attention no real token sees a pad.
        """
        rows = [expand_image_markers(s["input_ids"], s["labels"], self.config.image_token_id, num_vision_tokens)
                for s in samples]
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        pixel_values, image_mask = self.image_inputs([s["pixel_values"] for s in samples])
        return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=self.device),
                "labels": torch.tensor([labs + [IGNORE_INDEX] * (width - len(labs)) for _, labs in rows],
                                       device=self.device),
                "position_ids": torch.arange(width, device=self.device).expand(len(rows), -1),
                "pixel_values": pixel_values, "image_mask": image_mask}

    def prompt_embeddings(self, prompts_ids: Sequence[list[int]], pixel_values: torch.Tensor, image_mask: torch.Tensor,
                          num_vision_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded embeddings and attention mask for tokenized prompts whose image markers
        are not yet expanded; pixel_values and image_mask from image_inputs."""
        rows = [expand_image_markers(ids, ids, self.config.image_token_id, num_vision_tokens)[0]
                for ids in prompts_ids]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return self.embed(input_ids, pixel_values, image_mask, num_vision_tokens), attention_mask

    def inference_inputs(self, images: Sequence[Image.Image | None], prompts: Sequence[str],
                         num_vision_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt_embeddings for text prompts and PIL images; an image may be None (text-only)."""
        prompts_ids = [self.prompt_ids(prompt, image is not None) for image, prompt in zip(images, prompts, strict=True)]
        real_images = [image for image in images if image is not None]
        pixel_values, image_mask = self.image_inputs([self.pixel_values(real_images)] if real_images else [])
        return self.prompt_embeddings(prompts_ids, pixel_values, image_mask, num_vision_tokens)

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image | None], prompts: Sequence[str], num_vision_tokens: int,
                 max_new_tokens: int = 32) -> list[str]:
        """Greedy answers, one per prompt."""
        return self.generate_from(*self.inference_inputs(images, prompts, num_vision_tokens), max_new_tokens)

    @torch.no_grad()
    def generate_from(self, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> list[str]:
        """Greedy answers from left-padded prompt embeddings (see prompt_embeddings)."""
        output = self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask,
            generation_config=self.generation_config(max_new_tokens=max_new_tokens),
        )
        return [a.strip() for a in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    @torch.no_grad()
    def timed_prefill(self, make_inputs: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(embeds, attention_mask, seconds): make_inputs() (vision encoding and prompt embeddings)
        plus the prompt forward, the part that N changes. Kernels run asynchronously on an
        accelerator, so the clock reads only after the model's device has finished."""
        synchronize(self.device)
        started = time.perf_counter()
        embeds, attention_mask = make_inputs()
        self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=1)
        synchronize(self.device)
        return embeds, attention_mask, time.perf_counter() - started

    def prefill_seconds(self, images: Sequence[Image.Image | None], prompts: Sequence[str],
                        num_vision_tokens: int) -> float:
        return self.timed_prefill(lambda: self.inference_inputs(images, prompts, num_vision_tokens))[2]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on device (nothing to wait for on CPU)."""
    if device.type != "cpu":
        torch.get_device_module(device).synchronize(device)
