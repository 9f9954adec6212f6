"""What inference feeds the model (a mixin of TokenFlexVLM): prompts in the LM's chat format, their
images as tiles, and the batches a forward takes, built as training builds them.

Model folders carry this module as transformers remote code (see modeling_tokenflex.py).
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from .chat import IGNORE_INDEX, IMAGE_TOKEN, expand_image_markers, tokenize_record
from .folder import VLMConfig
from .images import tower_size
from .tiles import image_slots, prepare_images

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor


class InferenceInputs:
    """Inputs for evaluation, generation and benchmarks, on the model's device where it computes
    with them (its pixels), on the host where they only say where things are.

    A prompt's images: None or [] (text-only), one PIL image, or a list of them (in the order of
    the prompt's markers). max_tiles: at most this many tiles per image (tiles.py; None: what
    the model folder records)."""

    # what the model it is mixed into provides (TokenFlexVLM)
    config: VLMConfig
    tokenizer: PreTrainedTokenizerBase
    image_processor: "BaseImageProcessor"
    device: torch.device

    def prompt_ids(self, prompt: str, num_images: int) -> list[int]:
        """The prompt as one user turn (an image marker and a newline per image, then the text),
        up to the assistant header."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_turn(prompt, num_images)}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]

    def reply_ids(self, prompt: str, reply: str, num_images: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of the prompt's user turn answered by reply, as training tokenizes
        the conversation: the labels are the reply and its end token, split as the chat format
        splits them after the assistant header."""
        record = {"conversations": [{"from": "human", "value": user_turn(prompt, num_images)},
                                    {"from": "gpt", "value": reply}]}
        return tokenize_record(record, self.tokenizer, num_images, key=f"reply {reply!r}")

    def prepared_images(self, images: Image.Image | Sequence[Image.Image] | None, max_tiles: int | None = None) -> dict:
        """One prompt's images (see the class docstring) -> {"pixel_values": (tiles, 3, H, W) uint8
        or None, "image_grids": each image's (rows, cols)}, as the data loader decodes a sample."""
        pixels, grids = prepare_images(image_list(images), self.image_processor, max_tiles)
        return {"pixel_values": pixels, "image_grids": grids}

    def image_inputs(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """pixel_values on the model's device, image_mask and image_grids on the host (where embed
        reads them) for a forward: the samples' tiles (dicts with pixel_values, (tiles, 3, H, W)
        uint8 or None, and image_grids), or one masked-out dummy when there are none, since the
        vision path always runs (see embed)."""
        present = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        grids = torch.tensor([grid for s in samples for grid in s["image_grids"]], dtype=torch.long).view(-1, 2)
        if present:
            pixels = torch.cat(present).to(self.device)
            return {
                "pixel_values": pixels,
                "image_mask": torch.ones(len(pixels), dtype=torch.bool),
                "image_grids": grids,
            }
        height, width = tower_size(self.image_processor)
        return {"pixel_values": torch.zeros(1, 3, height, width, device=self.device, dtype=torch.uint8),
                "image_mask": torch.zeros(1, dtype=torch.bool), "image_grids": grids}

    def labelled_batch(self, samples: Sequence[dict], num_vision_tokens: int) -> dict[str, torch.Tensor]:
        """A forward batch as training builds one (markers expanded to their slots, per-sequence
        position_ids, real tiles flagged in image_mask), one sample per right-padded row, on the
        host but for the pixels (forward copies what the device computes with).

        samples: dicts with input_ids, labels, pixel_values and image_grids (see image_inputs).
        Right padding needs no attention mask: under causal attention no real token sees a pad.
        """
        rows = [expand_image_markers(s["input_ids"], s["labels"], self.config.image_token_id,
                                     [image_slots(grid, num_vision_tokens) for grid in s["image_grids"]])
                for s in samples]
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
                "labels": torch.tensor([labs + [IGNORE_INDEX] * (width - len(labs)) for _, labs in rows]),
                "position_ids": torch.arange(width).expand(len(rows), -1),
                **self.image_inputs(samples)}

    def prompt_embeddings(self, prompts_ids: Sequence[list[int]], images: dict[str, torch.Tensor],
                          num_vision_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded embeddings and attention mask for tokenized prompts whose image markers
        are not yet expanded; images: image_inputs of the prompts' samples, in order."""
        input_ids, attention_mask = self.left_padded_prompts(prompts_ids, images["image_grids"], num_vision_tokens)
        embeds = self.embed(input_ids, images["pixel_values"], images["image_mask"], num_vision_tokens,
                            images["image_grids"])
        return embeds, attention_mask

    def left_padded_prompts(self, prompts_ids: Sequence[list[int]], image_grids: torch.Tensor,
                            num_vision_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of tokenized prompts, left-padded, each image marker expanded
        to its image's slots at N (image_grids: the prompts' images' grids, in order)."""
        slots = iter([image_slots(grid, num_vision_tokens) for grid in image_grids.tolist()])
        rows = [expand_image_markers(ids, ids, self.config.image_token_id,
                                     [next(slots) for _ in range(ids.count(self.config.image_token_id))])[0]
                for ids in prompts_ids]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return input_ids, attention_mask

    def inference_inputs(self, images: Sequence, prompts: Sequence[str], num_vision_tokens: int,
                         max_tiles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt_embeddings for text prompts and each one's images (see the class docstring)."""
        prompts_ids = [
            self.prompt_ids(prompt, len(image_list(image))) for image, prompt in zip(images, prompts, strict=True)
        ]
        samples = [self.prepared_images(image, max_tiles) for image in images]
        return self.prompt_embeddings(prompts_ids, self.image_inputs(samples), num_vision_tokens)


def user_turn(prompt: str, num_images: int) -> str:
    """A prompt as the content of a user turn: an image marker and a newline per image before the text."""
    return f"{IMAGE_TOKEN}\n" * num_images + prompt


def image_list(images: Image.Image | Sequence[Image.Image] | None) -> list[Image.Image]:
    """A prompt's images as a list: None is none, one image is a list of one."""
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]
