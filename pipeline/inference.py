"""Inference helpers of TokenFlexVLM (a mixin): prompts in the LM's chat format, batches for a
forward, greedy generation with its prefill timed, and the log-likelihood of candidate replies,
each landing on the model's device and dtype.

Model folders carry this module as transformers remote code (see pipeline/model.py).
"""

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation import GenerateDecoderOnlyOutput

from .chat import IGNORE_INDEX, IMAGE_TOKEN, expand_image_markers, tokenize_record
from .images import tower_size
from .tiles import image_slots, prepare_images, tile_count

# Every spelling the tools (--dtype) and the lmms-eval model (dtype=) accept: the short names
# and torch's own (bfloat16, as lmms-eval's model_args give it).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name in DTYPES or a torch dtype; ValueError naming the accepted names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


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
    tokenizer, image_processor, config, embed, tile_layout, language_model and generation_config.

    A prompt's images: None or [] (text-only), one PIL image, or a list of them (in the order of
    the prompt's markers). max_tiles: at most this many tiles per image (pipeline/tiles.py; None:
    what the model folder records)."""

    def prompt_ids(self, prompt: str, num_images: int) -> list[int]:
        """The prompt as one user turn (an image marker and a newline per image, then the text),
        up to the assistant header."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user_turn(prompt, num_images)}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]

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
            return {"pixel_values": pixels, "image_mask": torch.ones(len(pixels), dtype=torch.bool), "image_grids": grids}
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
        prompts_ids = [self.prompt_ids(prompt, len(image_list(image))) for image, prompt in zip(images, prompts, strict=True)]
        samples = [self.prepared_images(image, max_tiles) for image in images]
        return self.prompt_embeddings(prompts_ids, self.image_inputs(samples), num_vision_tokens)

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
        input_ids = torch.tensor([ids + [self.tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows],
                                 device=self.device)
        labels = torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in rows], device=self.device)
        embeds = self.splice_images(input_ids, torch.cat([slots for slots, _ in row_slots]))
        hidden = self.lm_hidden_states(embeds, torch.arange(width, device=self.device).expand(len(rows), -1), None)
        targets = labels[:, 1:]  # each position's next-token label, as model.supervised_targets defines it
        supervised = targets != IGNORE_INDEX
        log_probs = self.language_model.lm_head(hidden[:, :-1][supervised]).float().log_softmax(-1)
        targets = targets[supervised]
        row = supervised.nonzero()[:, 0]
        sums = torch.zeros(len(rows), device=self.device).index_add_(0, row, log_probs.gather(-1, targets[:, None])[:, 0])
        misses = torch.zeros(len(rows), device=self.device).index_add_(0, row, (log_probs.argmax(-1) != targets).float())
        return [(float(total), not bool(missed)) for total, missed in zip(sums, misses)]


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Median and quartiles, in milliseconds, of timed runs: the median is the latency, q1 to q3
    its spread."""
    ms = sorted(1000 * s for s in seconds)
    q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else ms * 3
    return {"median": median, "q1": q1, "q3": q3, "runs": len(ms)}


def prefill_summary(seconds: Sequence[float]) -> dict[str, float]:
    """The latency of timed prefills and its spread, named as results, tables and lmms-eval's
    throughput summary name them: prefill_ms (the median), prefill_ms_q1 and prefill_ms_q3."""
    timing = latency_ms(seconds)
    return {"prefill_ms": timing["median"], "prefill_ms_q1": timing["q1"], "prefill_ms_q3": timing["q3"]}


def user_turn(prompt: str, num_images: int) -> str:
    """A prompt as the content of a user turn: an image marker and a newline per image before the text."""
    return f"{IMAGE_TOKEN}\n" * num_images + prompt


def image_list(images: Image.Image | Sequence[Image.Image] | None) -> list[Image.Image]:
    """A prompt's images as a list: None is none, one image is a list of one."""
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


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


class PrefillClock(LogitsProcessor):
    """Seconds from its creation until generation first asks it about logits, i.e. until the
    prompt's forward has finished. Kernels run asynchronously on an accelerator, so the clock
    reads only after the device has finished its queued work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = None
        synchronize(device)
        self.started = time.perf_counter()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.seconds is None:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.started
        return scores


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on device (nothing to wait for on CPU)."""
    if device.type != "cpu":
        torch.get_device_module(device).synchronize(device)
