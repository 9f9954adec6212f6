"""Answers, accuracy, loss and prefill latency of model folders at several vision-token counts.

Each held-out sample is read once (iter_samples, not resampled). Multi-turn records are scored
on their LAST question: the prompt holds every earlier turn (with the reference replies), the
model generates the last reply, and the loss is the cross-entropy of that reference reply
only. The synthetic records' question_type is the type of that last question.

Per model, tile limit, frame limit, N and frame count M: exact-match accuracy (answers normalised:
stripped, lower-cased, trailing punctuation dropped) overall and per question type, mean loss per
answer token, the vision tokens per image (its slots: N per tile plus row ends,
pipeline/model/tiles.py, averaged over the images) and per clip (its frames' slots: M per frame
plus a frame end, averaged over the clips), the prefill per batch (vision encoding + prompt
forward, the part N changes: its median and quartiles over the batches, in ms) and vision-token
throughput (image and frame slots / prefill seconds, over all batches), and the prefill's total.
Tile and frame limits re-read the data: tiles are cut and frames sampled as samples are decoded.
Each prediction carries its probability under the model (the product of its tokens'
probabilities): what the adaptive policy (pipeline/eval/adaptive.py) reads.

Scoring only: tools/evaluate.py writes the results, tools/report.py makes tables and plots.
"""

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.data import iter_samples
from pipeline.data.mixture import load_mixture
from pipeline.model.chat import IGNORE_INDEX
from pipeline.model.folder import read_vlm_config
from pipeline.model.runtime import prefill_summary
from pipeline.model.tiles import frame_markers, marker_slots, recorded_tiling
from pipeline.model.video import recorded_video_sampling
from pipeline.model.vlm import TokenFlexVLM

TRAILING_PUNCTUATION = ".,;:!?"


def normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(TRAILING_PUNCTUATION).strip()


# ---- batches ----

def last_reply_labels(sample: dict) -> list[int]:
    """The sample's labels with everything before its last reply masked: only the answer is scored."""
    prompt = sample["prompt_ids"]
    if sample["input_ids"][:len(prompt)] != prompt:
        raise ValueError(f"sample {sample['key']} in {sample['shard']}: its prompt is not a prefix of its tokens")
    return [IGNORE_INDEX] * len(prompt) + sample["labels"][len(prompt):]


def prompt_inputs(model: TokenFlexVLM, samples: Sequence[dict], num_vision_tokens: int,
                  num_frame_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt embeddings and attention mask of samples whose prompts hold earlier turns."""
    return model.prompt_embeddings([s["prompt_ids"] for s in samples], model.image_inputs(samples), num_vision_tokens,
                                   num_frame_tokens)


@torch.no_grad()
def evaluate_batch(model: TokenFlexVLM, samples: Sequence[dict], num_vision_tokens: int, max_new_tokens: int,
                   num_frame_tokens: int | None = None) -> tuple[list[str], list[float], float, float, int]:
    """(answers, their probabilities, prefill seconds, loss summed over answer tokens, answer
    tokens) for one batch, video frames at num_frame_tokens (None: N)."""
    answers, seconds, probabilities = model.scored_generate(
        lambda: prompt_inputs(model, samples, num_vision_tokens, num_frame_tokens), max_new_tokens)

    scored = [dict(s, labels=last_reply_labels(s)) for s in samples]
    batch = model.labelled_batch(scored, num_vision_tokens, num_frame_tokens)
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = model(batch, num_vision_tokens, num_frame_tokens=num_frame_tokens).loss
    return answers, probabilities, seconds, float(loss) * tokens, tokens


def visual_slots(sample: dict, num_vision_tokens: int, num_frame_tokens: int | None) -> tuple[int, int, int, int]:
    """(images, their slots, frames, their slots) of a sample at N and M."""
    slots = marker_slots(sample["image_grids"], sample.get("frame_mask"), num_vision_tokens, num_frame_tokens)
    frames = frame_markers(sample["image_grids"], sample.get("frame_mask"))
    frame_slots = sum(s for s, frame in zip(slots, frames) if frame)
    return len(frames) - sum(frames), sum(slots) - frame_slots, sum(frames), frame_slots


# ---- evaluation ----

def batches_of(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    samples = iter(samples)
    while batch := list(itertools.islice(samples, batch_size)):
        yield batch


def evaluate_model(model: TokenFlexVLM, samples: Iterable[dict], counts: Sequence[int], batch_size: int = 8,
                   max_new_tokens: int = 16, name: str = "model", total: int | None = None,
                   num_tiles: int | None = None, frame_counts: Sequence[int | None] = (None,),
                   num_frames: int | None = None) -> list[dict]:
    """One result dict per N and frame count M (see the module docstring) with the per-sample
    predictions.

    samples: an iterable of iter_samples items, streamed: only one batch of images is held at
    a time, and every N and M see each batch before the next one is read. total: for the
    progress bar. frame_counts: the M to pool video frames to (None: N). num_tiles, num_frames:
    the tile and frame limits the samples were decoded with (None: the folder's), for the results.
    """
    model.eval()
    for n in [*counts, *filter(None, frame_counts)]:
        model.config.check_token_count(n)
    seen = []
    runs = {(n, m): {"answers": [], "probabilities": [], "seconds": [], "loss_sum": 0.0, "loss_tokens": 0,
                     "images": 0, "slots": 0, "clips": 0, "clip_slots": 0}
            for n in counts for m in frame_counts}
    progress = tqdm(total=total, desc=f"evaluating {name}", unit="sample")
    for batch in batches_of(samples, batch_size):
        if not seen:  # one untimed sample first: the first forward pays for allocation and set-up
            evaluate_batch(model, batch[:1], counts[0], 1)
        seen += [{"key": s["key"], "answer": s["answer"], "question_type": s["record"].get("question_type", "all"),
                  "image": s["pixel_values"] is not None} for s in batch]
        for (n, m), run in runs.items():
            answers, probabilities, seconds, loss_sum, loss_tokens = evaluate_batch(model, batch, n, max_new_tokens, m)
            run["answers"] += answers
            run["probabilities"] += probabilities
            run["seconds"].append(seconds)
            run["loss_sum"] += loss_sum
            run["loss_tokens"] += loss_tokens
            for images, slots, frames, clip_slots in (visual_slots(s, n, m) for s in batch):
                run["images"] += images
                run["slots"] += slots
                run["clips"] += frames > 0
                run["clip_slots"] += clip_slots
        progress.update(len(batch))
    progress.close()
    if not seen:
        raise ValueError("no usable samples to evaluate")
    return [score(seen, run["answers"]) | {
        "model": name, "num_vision_tokens": n, "num_frame_tokens": n if m is None else m,
        "num_tiles": num_tiles or recorded_tiling(model.image_processor)[0],
        "num_frames": recorded_video_sampling(model.image_processor, num_frames)[0],
        "vision_tokens_per_image": run["slots"] / run["images"] if run["images"] else None,
        "vision_tokens_per_clip": run["clip_slots"] / run["clips"] if run["clips"] else None,
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "loss": run["loss_sum"] / run["loss_tokens"] if run["loss_tokens"] else None,
        **prefill_summary(run["seconds"]), "prefill_total_s": sum(run["seconds"]),
        "vision_tokens_per_s": (run["slots"] + run["clip_slots"]) / sum(run["seconds"]),
        "predictions": [dict(s, prediction=a, probability=p) for s, a, p in zip(seen, run["answers"],
                                                                                 run["probabilities"])],
    } for (n, m), run in runs.items()]


def score(samples: Sequence[dict], answers: Sequence[str]) -> dict:
    """Exact-match accuracy of answers against samples' reference answers, overall and per question_type."""
    hits = [normalise(a) == normalise(s["answer"]) for s, a in zip(samples, answers, strict=True)]
    by_type = {}
    for sample, hit in zip(samples, hits):
        by_type.setdefault(sample["question_type"], []).append(hit)
    return {"samples": len(hits), "accuracy": sum(hits) / len(hits),
            "accuracy_by_type": {t: sum(h) / len(h) for t, h in sorted(by_type.items())},
            "samples_by_type": {t: len(h) for t, h in sorted(by_type.items())}}


def evaluate(model_dirs: Sequence[str | Path], shards: str | Path, counts: Sequence[int],
             names: Sequence[str] | None = None, limit: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 16, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
             tiles: Sequence[int | None] = (None,), frames: Sequence[int | None] = (None,),
             frame_counts: Sequence[int | None] = (None,)) -> dict:
    """Every model at every tile limit and frame limit (None: the folder's own), N and frame count
    M (None: N): {"shards", "limit", "batch_size", "token_counts", "tile_counts", "frame_limits",
    "frame_counts", "results"}, with one result per model, tile limit, frame limit, N and M
    (evaluate_model's, plus the folder's path; with several tile or frame limits the model's name
    says its limits, "name tiles=T frames=F")."""
    names = names or default_names(model_dirs)
    if len(names) != len(model_dirs):
        raise ValueError(f"{len(names)} names (--names) for {len(model_dirs)} model folders")
    load_mixture(str(shards))  # fail before any model runs
    for path in model_dirs:
        for n in [*counts, *filter(None, frame_counts)]:
            read_vlm_config(path).check_token_count(n)
    results = []
    for name, path in zip(names, model_dirs):
        model = TokenFlexVLM.from_pretrained(path, device, dtype)
        for num_tiles, num_frames in itertools.product(tiles, frames):
            samples = itertools.islice(iter_samples(shards, model.tokenizer, model.image_processor,
                                                    max_tiles=num_tiles, num_frames=num_frames), limit)
            label = name + (f" tiles={num_tiles}" if len(tiles) > 1 else "") + (
                f" frames={num_frames}" if len(frames) > 1 else "")
            for result in evaluate_model(model, samples, counts, batch_size, max_new_tokens, label, limit, num_tiles,
                                         frame_counts, num_frames):
                results.append(dict(result, path=str(path)))
        del model  # frees its memory before the next model loads
    return {"shards": str(shards), "limit": limit, "batch_size": batch_size, "token_counts": list(counts),
            "tile_counts": list(tiles), "frame_limits": list(frames), "frame_counts": list(frame_counts),
            "results": results}


def default_names(model_dirs: Sequence[str | Path]) -> list[str]:
    names = [Path(p).name for p in model_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in model_dirs]
