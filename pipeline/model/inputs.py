"""What inference feeds the model (a mixin of TokenFlexVLM): prompts in the LM's chat format, their
images as tiles and their videos as sampled frames, and the batches a forward takes, built as
training builds them.

Model folders carry this module as transformers remote code (see modeling_tokenflex.py).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from .chat import IGNORE_INDEX, IMAGE_TOKEN, expand_image_markers, frames_as_markers, tokenize_record
from .folder import VLMConfig
from .images import rgb_pixels, tower_size
from .tiles import marker_slots, recorded_tiling, sample_visuals
from .video import decode_frames, recorded_video_sampling

Visual = Image.Image | str | Path | bytes  # an image, or a video clip: its file's path or bytes

if TYPE_CHECKING:  # for annotations only: transformers' image processor base is slow to import
    from transformers.image_processing_utils import BaseImageProcessor


class InferenceInputs:
    """Inputs for evaluation, generation and benchmarks, on the model's device where it computes
    with them (its pixels), on the host where they only say where things are.

    A prompt's images: None or [] (text-only), one visual, or a list of them (in the order of the
    prompt's markers); a visual is a PIL image or a video clip (its file's path or bytes), whose
    frames are sampled as training sampled them (video.py). max_tiles: at most this many tiles
    per image (tiles.py; None: what the model folder records); num_frames: at most this many
    frames per clip (None: what the folder records, data.video_frames)."""

    # what the model it is mixed into provides (TokenFlexVLM)
    config: VLMConfig
    tokenizer: PreTrainedTokenizerBase
    image_processor: "BaseImageProcessor"
    device: torch.device

    def prompt_ids(self, prompt: str, num_images: int, frames_per_visual: Sequence[int] | None = None) -> list[int]:
        """The prompt as one user turn (an image marker and a newline per image or video, then the
        text), up to the assistant header; frames_per_visual (prepared_images') repeats a video's
        marker once per frame, as training does."""
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_turn(prompt, num_images)}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        return ids if frames_per_visual is None else frames_as_markers(ids, ids, self.config.image_token_id,
                                                                       frames_per_visual)[0]

    def reply_ids(self, prompt: str, reply: str, num_images: int, frames_per_visual: Sequence[int] | None = None
                  ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of the prompt's user turn answered by reply, as training tokenizes
        the conversation: the labels are the reply and its end token, split as the chat format
        splits them after the assistant header (frames_per_visual: see prompt_ids)."""
        record = {"conversations": [{"from": "human", "value": user_turn(prompt, num_images)},
                                    {"from": "gpt", "value": reply}]}
        ids, labels = tokenize_record(record, self.tokenizer, num_images, key=f"reply {reply!r}")
        if frames_per_visual is None:
            return ids, labels
        return frames_as_markers(ids, labels, self.config.image_token_id, frames_per_visual)

    def prepared_images(self, images: Visual | Sequence[Visual] | None, max_tiles: int | None = None,
                        num_frames: int | None = None) -> dict:
        """One prompt's visuals (see the class docstring) -> {"pixel_values": (tiles, 3, H, W) uint8
        or None, "image_grids": each image's (rows, cols) and each frame's (1, 1), "frame_mask":
        which tiles are frames (None without a video), "frames_per_visual": 1 per image, a clip's
        frame count per video}, as the data loader decodes a sample."""
        visuals = [decode_frames(v, *recorded_video_sampling(self.image_processor, num_frames)) if is_video(v)
                   else rgb_pixels(v) for v in image_list(images)]
        pixels, grids, frame_mask = sample_visuals(visuals, self.image_processor,
                                                   *recorded_tiling(self.image_processor, max_tiles))
        return {"pixel_values": pixels, "image_grids": grids, "frame_mask": frame_mask,
                "frames_per_visual": [len(v) if isinstance(v, list) else 1 for v in visuals]}

    def image_inputs(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """pixel_values on the model's device, image_mask, image_grids and frame_mask on the host
        (where embed reads them) for a forward: the samples' tiles (dicts with pixel_values, (tiles,
        3, H, W) uint8 or None, image_grids and optionally frame_mask), or one masked-out dummy when
        there are none, since the vision path always runs (see embed)."""
        present = [s for s in samples if s["pixel_values"] is not None]
        grids = torch.tensor([grid for s in samples for grid in s["image_grids"]], dtype=torch.long).view(-1, 2)
        if present:
            pixels = torch.cat([s["pixel_values"] for s in present]).to(self.device)
            return {
                "pixel_values": pixels,
                "image_mask": torch.ones(len(pixels), dtype=torch.bool),
                "image_grids": grids,
                "frame_mask": torch.cat([frame_flags(s) for s in present]),
            }
        height, width = tower_size(self.image_processor)
        return {"pixel_values": torch.zeros(1, 3, height, width, device=self.device, dtype=torch.uint8),
                "image_mask": torch.zeros(1, dtype=torch.bool), "image_grids": grids,
                "frame_mask": torch.zeros(1, dtype=torch.bool)}

    def labelled_batch(self, samples: Sequence[dict], num_vision_tokens: int,
                       num_frame_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """A forward batch as training builds one (markers expanded to their slots, per-sequence
        position_ids, real tiles flagged in image_mask), one sample per right-padded row, on the
        host but for the pixels (forward copies what the device computes with).

        samples: dicts with input_ids, labels, pixel_values and image_grids (see image_inputs).
        Right padding needs no attention mask: under causal attention no real token sees a pad.
        """
        rows = [expand_image_markers(s["input_ids"], s["labels"], self.config.image_token_id,
                                     marker_slots(s["image_grids"], s.get("frame_mask"), num_vision_tokens,
                                                  num_frame_tokens))
                for s in samples]
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
                "labels": torch.tensor([labs + [IGNORE_INDEX] * (width - len(labs)) for _, labs in rows]),
                "position_ids": torch.arange(width).expand(len(rows), -1),
                **self.image_inputs(samples)}

    def prompt_embeddings(self, prompts_ids: Sequence[list[int]], images: dict[str, torch.Tensor],
                          num_vision_tokens: int, num_frame_tokens: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded embeddings and attention mask for tokenized prompts whose image markers
        are not yet expanded (one per image or frame); images: image_inputs of the prompts'
        samples, in order. Frames pool to num_frame_tokens (None: N)."""
        input_ids, attention_mask = self.left_padded_prompts(prompts_ids, images["image_grids"], num_vision_tokens,
                                                             images.get("frame_mask"), num_frame_tokens)
        embeds = self.embed(input_ids, images["pixel_values"], images["image_mask"], num_vision_tokens,
                            images["image_grids"], images.get("frame_mask"), num_frame_tokens)
        return embeds, attention_mask

    def left_padded_prompts(self, prompts_ids: Sequence[list[int]], image_grids: torch.Tensor,
                            num_vision_tokens: int, frame_mask: torch.Tensor | None = None,
                            num_frame_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of tokenized prompts, left-padded, each image marker expanded
        to its image's slots at N, each frame's to its slots at M (image_grids and frame_mask: the
        prompts' images' and frames' grids and flags, in order)."""
        slots = iter(marker_slots(image_grids.tolist(), frame_mask, num_vision_tokens, num_frame_tokens))
        rows = [expand_image_markers(ids, ids, self.config.image_token_id,
                                     [next(slots) for _ in range(ids.count(self.config.image_token_id))])[0]
                for ids in prompts_ids]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return input_ids, attention_mask

    def inference_inputs(self, images: Sequence, prompts: Sequence[str], num_vision_tokens: int,
                         max_tiles: int | None = None, num_frame_tokens: int | None = None,
                         num_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt_embeddings for text prompts and each one's images and videos (see the class
        docstring), the videos' frames at num_frame_tokens (None: N)."""
        samples = [self.prepared_images(image, max_tiles, num_frames) for image in images]
        prompts_ids = [self.prompt_ids(prompt, len(sample["frames_per_visual"]), sample["frames_per_visual"])
                       for sample, prompt in zip(samples, prompts, strict=True)]
        return self.prompt_embeddings(prompts_ids, self.image_inputs(samples), num_vision_tokens, num_frame_tokens)


def user_turn(prompt: str, num_images: int) -> str:
    """A prompt as the content of a user turn: an image marker and a newline per image (or video)
    before the text."""
    return f"{IMAGE_TOKEN}\n" * num_images + prompt


def frame_flags(sample: dict) -> torch.Tensor:
    """(tiles,) bool: a sample's frame_mask, all False when it has none (no video)."""
    mask = sample.get("frame_mask")
    return torch.zeros(len(sample["pixel_values"]), dtype=torch.bool) if mask is None else mask


def is_video(visual: Visual) -> bool:
    """A video clip (a path or bytes), not a PIL image."""
    return isinstance(visual, (str, Path, bytes))


def image_list(images: Visual | Sequence[Visual] | None) -> list[Visual]:
    """A prompt's visuals as a list: None is none, one image or clip is a list of one."""
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]
