"""Inference on a TokenFlexVLM (a mixin): greedy generation with its prefill timed, each answer's
probability, and the log-likelihood of candidate replies.

Model folders carry this module as transformers remote code (see modeling_tokenflex.py).
"""

from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessorList, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput

from .chat import IGNORE_INDEX, expand_image_markers
from .inputs import InferenceInputs
from .loss import loss_targets
from .runtime import PrefillClock, on_device
from .tiles import TileLayout, image_slots, tile_count


class Inference(InferenceInputs):
    """Generation and reply scoring, of prompts and images as InferenceInputs builds them (a
    prompt's images and max_tiles: see there). The model it is mixed into provides the attributes
    below and its forward path: encode_images, splice_images, lm_hidden_states, generation_config."""

    language_model: PreTrainedModel
    tile_layout: TileLayout

    @torch.no_grad()
    def generate(self, images: Sequence, prompts: Sequence[str], num_vision_tokens: int,
                 max_new_tokens: int = 32, max_tiles: int | None = None) -> list[str]:
        """Greedy answers, one per prompt."""
        return self.timed_generate(lambda: self.inference_inputs(images, prompts, num_vision_tokens, max_tiles),
                                   max_new_tokens)[0]

    @torch.no_grad()
    def timed_generate(self, make_inputs: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                       max_new_tokens: int) -> tuple[list[str], float]:
        """(greedy answers, prefill seconds) from make_inputs()'s left-padded prompt embeddings and
        attention mask (see prompt_embeddings). The prefill, the part N changes, is make_inputs()
        (vision encoding, embeddings) plus generation's own forward over the prompt, read when the
        first token's logits are ready: the prompt runs through the LM once."""
        answers, seconds, _ = self.scored_generate(make_inputs, max_new_tokens, probabilities=False)
        return answers, seconds

    @torch.no_grad()
    def scored_generate(self, make_inputs: Callable[[], tuple[torch.Tensor, torch.Tensor]], max_new_tokens: int,
                        probabilities: bool = True) -> tuple[list[str], float, list[float] | None]:
        """timed_generate's (answers, prefill seconds) and each answer's probability under the
        model: the product of its generated tokens' probabilities up to and including the first
        end token (None when probabilities=False, which keeps no logits)."""
        clock = PrefillClock(self.device)
        embeds, attention_mask = make_inputs()
        output = self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, logits_processor=LogitsProcessorList([clock]),
            generation_config=self.generation_config(max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                                                     output_logits=probabilities),
        )
        answers = [a.strip() for a in self.tokenizer.batch_decode(output.sequences, skip_special_tokens=True)]
        return answers, clock.seconds, self.answer_probabilities(output) if probabilities else None

    def answer_probabilities(self, output: GenerateDecoderOnlyOutput) -> list[float]:
        """Per generated sequence, the product of its tokens' probabilities (from the raw logits)
        up to and including its first end token; the padding generation adds after it counts nothing."""
        logits = torch.stack(output.logits, dim=1).float()  # (batch, steps, vocab)
        tokens = output.sequences[:, -logits.shape[1]:]  # generate returns only new tokens from embeddings
        log_probs = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        ended = torch.isin(tokens, torch.tensor(self.generation_config().eos_token_id, device=tokens.device))
        after_end = (ended.long().cumsum(1) - ended.long()) > 0
        return log_probs.masked_fill(after_end, 0.0).sum(1).exp().tolist()

    def prefill_seconds(self, images: Sequence, prompts: Sequence[str], num_vision_tokens: int,
                        max_tiles: int | None = None) -> float:
        """One timed prefill: generation of a single token."""
        return self.timed_generate(lambda: self.inference_inputs(images, prompts, num_vision_tokens, max_tiles), 1)[1]

    def prefill_repeats(self, images: Sequence, prompts: Sequence[str], num_vision_tokens: int,
                        repeats: int = 5, max_tiles: int | None = None) -> list[float]:
        """Seconds of `repeats` timed prefills after an untimed one, which pays for allocation and
        set-up: the samples behind a latency's median and spread."""
        self.prefill_seconds(images, prompts, num_vision_tokens, max_tiles)
        return [self.prefill_seconds(images, prompts, num_vision_tokens, max_tiles) for _ in range(repeats)]

    @torch.no_grad()
    def reply_log_likelihoods(self, images: Sequence, prompts: Sequence[str], replies: Sequence[Sequence[str]],
                              num_vision_tokens: int, batch_size: int = 1,
                              max_tiles: int | None = None) -> list[list[tuple[float, bool]]]:
        """For each prompt (with its images, see the class docstring) and each of its candidate
        replies: (the reply's log-likelihood, whether greedy decoding gives exactly it). A reply is
        scored as training scores it (reply_ids): its tokens after the assistant header and its
        end token.

        Each prompt's images are encoded once for all of its replies, with the other images of its
        chunk; the LM scores at most batch_size replies per forward.
        """
        scores = []
        for chunk in chunks_by_rows(replies, batch_size):
            samples = [self.prepared_images(images[i], max_tiles) for i in chunk]
            present = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
            tiles = self.encode_images(torch.cat(present).to(self.device), num_vision_tokens) if present else None
            slots_of_prompt, tile = [], 0  # each prompt's image slots, (slots, lm_dim)
            for sample in samples:
                count = sum(tile_count(grid) for grid in sample["image_grids"])
                slots_of_prompt.append(self.tile_layout(tiles[tile:tile + count], sample["image_grids"]) if count else
                                       torch.zeros(0, self.language_model.config.hidden_size, device=self.device))
                tile += count
            rows, row_slots = [], []
            for i, sample, slots in zip(chunk, samples, slots_of_prompt):
                counts = [image_slots(grid, num_vision_tokens) for grid in sample["image_grids"]]
                for reply in replies[i]:
                    rows.append(self.reply_ids(prompts[i], reply, len(counts)))
                    row_slots.append((slots, counts))
            row_scores = []
            for start in range(0, len(rows), batch_size):
                row_scores += self.score_rows(rows[start:start + batch_size], row_slots[start:start + batch_size])
            for i in chunk:
                scores.append(row_scores[:len(replies[i])])
                row_scores = row_scores[len(replies[i]):]
        return scores

    def score_rows(self, rows: Sequence[tuple[list[int], list[int]]],
                   row_slots: Sequence[tuple[torch.Tensor, list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-probability of the labelled tokens, whether each is the argmax) per row of
        (input_ids, labels); row_slots: per row, its images' slot embeddings ((slots, lm_dim), see
        TileLayout) and each image's slot count. Rows are right-padded: under causal attention no
        real token sees a pad."""
        rows = [expand_image_markers(ids, labels, self.config.image_token_id, counts)
                for (ids, labels), (_, counts) in zip(rows, row_slots, strict=True)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.tensor([ids + [self.tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in rows])
        embeds = self.splice_images(input_ids, torch.cat([slots for slots, _ in row_slots]))
        hidden = self.lm_hidden_states(embeds, torch.arange(width).expand(len(rows), -1), None)
        targets = loss_targets(labels, None, "token")
        positions, tokens, row = (on_device(t, self.device) for t in (targets.positions, targets.labels,
                                                                       targets.positions // width))
        log_probs = self.language_model.lm_head(hidden.flatten(0, 1).index_select(0, positions)).float().log_softmax(-1)
        sums = torch.zeros(len(rows), device=self.device).index_add_(
            0, row, log_probs.gather(-1, tokens[:, None])[:, 0]
        )
        misses = torch.zeros(len(rows), device=self.device).index_add_(0, row, (log_probs.argmax(-1) != tokens).float())
        return [(float(total), not bool(missed)) for total, missed in zip(sums, misses)]


def chunks_by_rows(replies: Sequence[Sequence[str]], rows: int) -> list[list[int]]:
    """Consecutive prompt indices whose replies add up to at most `rows` (a prompt with more
    replies is a chunk of its own)."""
    chunks, size = [], 0
    for i, candidates in enumerate(replies):
        if not chunks or size + len(candidates) > rows:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += len(candidates)
    return chunks
