"""Adaptive N at inference: each image and question answered at the smallest vision-token count
of a ladder whose answer the model is confident in.

The policy (first_confident): try the ladder's counts in increasing order (default 16, 64, 144,
256); at each, answer greedily and read the answer's probability (the product of its tokens'
probabilities, end token included: Inference.scored_generate); keep the first answer whose
probability is at least the threshold, else the last count's. A text-only question has no N:
it is answered once.

The vision tower runs once per image (once per tile with tiles): every try re-pools the same
tower features to its N (model.projector(features, N)), so a try costs the projector and the
LM's prompt forward. Its threshold is calibrated on a validation split: adaptive_study.py.
"""

import time
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.model.folder import VLMConfig
from pipeline.model.runtime import synchronize
from pipeline.model.vlm import TokenFlexVLM

DEFAULT_LADDER = (16, 64, 144, 256)


def check_ladder(ladder: Sequence[int], config: VLMConfig) -> None:
    """ValueError unless the ladder is at least two increasing counts the model can serve."""
    if len(ladder) < 2 or list(ladder) != sorted(set(ladder)):
        raise ValueError(f"ladder {list(ladder)}: give at least two increasing token counts")
    for n in ladder:
        config.check_token_count(n)


def first_confident(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """The policy on (questions, tries) answer probabilities: per question, the index of the
    first try whose probability reaches threshold, the last try when none does."""
    confident = probabilities >= threshold
    confident[:, -1] = True
    return confident.argmax(axis=1)


@torch.no_grad()
def adaptive_generate(model: TokenFlexVLM, samples: Sequence[dict], ladder: Sequence[int], threshold: float,
                      max_new_tokens: int) -> tuple[list[dict], float]:
    """Per sample, {"prediction", "chosen_tokens" (None without an image), "probability",
    "tries"}; and the prefill seconds: the tower once for the batch's tiles, plus every try's
    prefill (re-pooling, tile layout, splicing and the prompt's forward).

    samples: dicts with prompt_ids, pixel_values ((tiles, 3, H, W) uint8 or None: text-only) and
    image_grids, as iter_samples gives them."""
    tile_rows, first = {}, 0  # per sample with images: its tiles' rows in the tower's features
    for i, sample in enumerate(samples):
        if sample["pixel_values"] is not None:
            tile_rows[i] = list(range(first, first + len(sample["pixel_values"])))
            first += len(sample["pixel_values"])
    seconds = 0.0
    if tile_rows:
        synchronize(model.device)
        started = time.perf_counter()
        features = model.image_features(model.image_inputs(samples)["pixel_values"])
        synchronize(model.device)
        seconds += time.perf_counter() - started
    results, pending = [None] * len(samples), list(range(len(samples)))
    for attempt, n in enumerate(ladder, start=1):
        def make_inputs(asked: tuple[int, ...] = tuple(pending), n: int = n) -> tuple[torch.Tensor, torch.Tensor]:
            grids = [grid for i in asked for grid in samples[i]["image_grids"]]
            input_ids, attention_mask = model.left_padded_prompts(
                [samples[i]["prompt_ids"] for i in asked], torch.tensor(grids, dtype=torch.long).view(-1, 2), n)
            rows = [row for i in asked for row in tile_rows.get(i, [])]
            tile_embeds = (model.projector(features[rows], n) if rows else
                           torch.zeros(0, n, model.language_model.config.hidden_size, device=model.device))
            return model.splice_images(input_ids, model.tile_layout(tile_embeds, grids)), attention_mask

        answers, try_seconds, probabilities = model.scored_generate(make_inputs, max_new_tokens)
        seconds += try_seconds
        still = []
        for i, answer, probability in zip(pending, answers, probabilities, strict=True):
            has_image = i in tile_rows
            if not has_image or probability >= threshold or attempt == len(ladder):
                results[i] = {"prediction": answer, "chosen_tokens": n if has_image else None,
                              "probability": probability, "tries": attempt}
            else:
                still.append(i)
        pending = still
        if not pending:
            break
    return results, seconds


def mean_over_images(results: Sequence[dict], key: str) -> float | None:
    """The mean of key over adaptive_generate's results for prompts with an image (None without any)."""
    values = [r[key] for r in results if r["chosen_tokens"] is not None]
    return sum(values) / len(values) if values else None
