"""Answers, accuracy, loss and prefill latency of model folders at several vision-token counts.

Each held-out sample is read once (iter_samples, not resampled). Multi-turn records are scored
on their LAST question: the prompt holds every earlier turn (with the reference replies), the
model generates the last reply, and the loss is the cross-entropy of that reference reply
only. The synthetic records' question_type is the type of that last question.

Per model, tile limit and N: exact-match accuracy (answers normalised: stripped, lower-cased,
trailing punctuation dropped) overall and per question type, mean loss per answer token, the
vision tokens per image (its slots: N per tile plus row ends, pipeline/model/tiles.py, averaged over
the images), the prefill per batch (vision encoding + prompt forward, the part N changes: its
median and quartiles over the batches, in ms) and vision-token throughput (image slots /
prefill seconds, over all batches), and the prefill's total. Tile limits re-read the data:
tiles are cut as samples are decoded. Each prediction carries its probability under the model
(the product of its tokens' probabilities): what the adaptive policy (pipeline/eval/adaptive.py) reads.

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
from pipeline.model.tiles import image_slots, recorded_tiling
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


def prompt_inputs(model: TokenFlexVLM, samples: Sequence[dict], num_vision_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt embeddings and attention mask of samples whose prompts hold earlier turns."""
    return model.prompt_embeddings([s["prompt_ids"] for s in samples], model.image_inputs(samples), num_vision_tokens)


@torch.no_grad()
def evaluate_batch(model: TokenFlexVLM, samples: Sequence[dict], num_vision_tokens: int, max_new_tokens: int
                   ) -> tuple[list[str], list[float], float, float, int]:
    """(answers, their probabilities, prefill seconds, loss summed over answer tokens, answer
    tokens) for one batch."""
    answers, seconds, probabilities = model.scored_generate(lambda: prompt_inputs(model, samples, num_vision_tokens),
                                                            max_new_tokens)

    scored = [dict(s, labels=last_reply_labels(s)) for s in samples]
    batch = model.labelled_batch(scored, num_vision_tokens)
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = model(batch, num_vision_tokens).loss
    return answers, probabilities, seconds, float(loss) * tokens, tokens


# ---- evaluation ----

def batches_of(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    samples = iter(samples)
    while batch := list(itertools.islice(samples, batch_size)):
        yield batch


def evaluate_model(model: TokenFlexVLM, samples: Iterable[dict], counts: Sequence[int], batch_size: int = 8,
                   max_new_tokens: int = 16, name: str = "model", total: int | None = None,
                   num_tiles: int | None = None) -> list[dict]:
    """One result dict per N (see the module docstring) with the per-sample predictions.

    samples: an iterable of iter_samples items, streamed: only one batch of images is held at
    a time, and every N sees each batch before the next one is read. total: for the progress bar.
    num_tiles: the tile limit the samples were decoded with (None: the folder's), for the results.
    """
    model.eval()
    for n in counts:
        model.config.check_token_count(n)
    seen = []
    runs = {n: {"answers": [], "probabilities": [], "seconds": [], "loss_sum": 0.0, "loss_tokens": 0, "images": 0,
                "slots": 0}
            for n in counts}
    progress = tqdm(total=total, desc=f"evaluating {name}", unit="sample")
    for batch in batches_of(samples, batch_size):
        if not seen:  # one untimed sample first: the first forward pays for allocation and set-up
            evaluate_batch(model, batch[:1], counts[0], 1)
        seen += [{"key": s["key"], "answer": s["answer"], "question_type": s["record"].get("question_type", "all"),
                  "image": s["pixel_values"] is not None} for s in batch]
        for n, run in runs.items():
            answers, probabilities, seconds, loss_sum, loss_tokens = evaluate_batch(model, batch, n, max_new_tokens)
            run["answers"] += answers
            run["probabilities"] += probabilities
            run["seconds"].append(seconds)
            run["loss_sum"] += loss_sum
            run["loss_tokens"] += loss_tokens
            run["images"] += sum(len(s["image_grids"]) for s in batch)
            run["slots"] += sum(image_slots(grid, n) for s in batch for grid in s["image_grids"])
        progress.update(len(batch))
    progress.close()
    if not seen:
        raise ValueError("no usable samples to evaluate")
    return [score(seen, run["answers"]) | {
        "model": name, "num_vision_tokens": n, "num_tiles": num_tiles or recorded_tiling(model.image_processor)[0],
        "vision_tokens_per_image": run["slots"] / run["images"] if run["images"] else None,
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "loss": run["loss_sum"] / run["loss_tokens"] if run["loss_tokens"] else None,
        **prefill_summary(run["seconds"]), "prefill_total_s": sum(run["seconds"]),
        "vision_tokens_per_s": run["slots"] / sum(run["seconds"]),
        "predictions": [dict(s, prediction=a, probability=p) for s, a, p in zip(seen, run["answers"],
                                                                                 run["probabilities"])],
    } for n, run in runs.items()]


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
             tiles: Sequence[int | None] = (None,)) -> dict:
    """Every model at every tile limit (None: the folder's own) and N: {"shards", "limit",
    "batch_size", "token_counts", "tile_counts", "results"}, with one result per model, tile
    limit and N (evaluate_model's, plus the folder's path; with several tile limits the model's
    name says its limit, "name tiles=T")."""
    names = names or default_names(model_dirs)
    if len(names) != len(model_dirs):
        raise ValueError(f"{len(names)} names (--names) for {len(model_dirs)} model folders")
    load_mixture(str(shards))  # fail before any model runs
    for path in model_dirs:
        for n in counts:
            read_vlm_config(path).check_token_count(n)
    results = []
    for name, path in zip(names, model_dirs):
        model = TokenFlexVLM.from_pretrained(path, device, dtype)
        for num_tiles in tiles:
            samples = itertools.islice(iter_samples(shards, model.tokenizer, model.image_processor,
                                                    max_tiles=num_tiles), limit)
            label = name if len(tiles) == 1 else f"{name} tiles={num_tiles}"
            for result in evaluate_model(model, samples, counts, batch_size, max_new_tokens, label, limit, num_tiles):
                results.append(dict(result, path=str(path)))
        del model  # frees its memory before the next model loads
    return {"shards": str(shards), "limit": limit, "batch_size": batch_size, "token_counts": list(counts),
            "tile_counts": list(tiles), "results": results}


def default_names(model_dirs: Sequence[str | Path]) -> list[str]:
    names = [Path(p).name for p in model_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in model_dirs]
