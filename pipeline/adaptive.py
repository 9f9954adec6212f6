"""Adaptive N at inference: each image and question answered at the smallest vision-token count
of a ladder whose answer the model is confident in.

The policy (first_confident): try the ladder's counts in increasing order (default 16, 64, 144,
256); at each, answer greedily and read the answer's probability (the product of its tokens'
probabilities, end token included: InferenceMixin.scored_generate); keep the first answer whose
probability is at least the threshold, else the last count's. A text-only question has no N:
it is answered once.

The vision tower runs once per image (once per tile with tiles): every try re-pools the same
tower features to its N (model.projector(features, N)), so a try costs the projector and the
LM's prompt forward.

The threshold is calibrated on a validation split (calibrate): from each count's answers and
their probabilities there, the threshold with the fewest mean vision tokens whose accuracy is
within max_drop of the best fixed count's. The oracle (oracle_result) answers each question at
the smallest count that answers it right (at the smallest count when none does): no policy over
the ladder can be more accurate, or cheaper at that accuracy.

Mean vision tokens are over the questions with an image; accuracy is over all of them.
"""

import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import iter_samples
from pipeline.data.mixture import resolve_source
from pipeline.evaluate import batches_of, default_names, evaluate_model, normalise, score
from pipeline.inference import prefill_summary, synchronize
from pipeline.model import TokenFlexVLM, VLMConfig, read_vlm_config

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


# ---- the policy, run ----

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


def evaluate_adaptive_model(model: TokenFlexVLM, samples: Iterable[dict], ladder: Sequence[int], threshold: float,
                            batch_size: int = 8, max_new_tokens: int = 16, name: str = "model",
                            total: int | None = None) -> dict:
    """The policy on every sample: score() plus mean vision tokens (overall and per question
    type), the prefill (per batch, and its total over the run: every try included), tries per
    image and the predictions, each with its chosen N and probability."""
    model.eval()
    check_ladder(ladder, model.config)
    seen, seconds = [], []
    progress = tqdm(total=total, desc=f"adaptive {name}", unit="sample")
    for batch in batches_of(samples, batch_size):
        if not seen:  # one untimed sample first: the first forward pays for allocation and set-up
            adaptive_generate(model, batch[:1], ladder, threshold, 1)
        results, batch_seconds = adaptive_generate(model, batch, ladder, threshold, max_new_tokens)
        seen += [question(s) | r for s, r in zip(batch, results)]
        seconds.append(batch_seconds)
        progress.update(len(batch))
    progress.close()
    if not seen:
        raise ValueError("no usable samples to evaluate")
    return policy_result(seen, "adaptive", name, model) | {
        "threshold": threshold, "ladder": list(ladder), "tries_per_image": mean_over_images(seen, "tries"),
        **prefill_summary(seconds), "prefill_total_s": sum(seconds)}


def mean_over_images(results: Sequence[dict], key: str) -> float | None:
    """The mean of key over adaptive_generate's results for prompts with an image (None without any)."""
    values = [r[key] for r in results if r["chosen_tokens"] is not None]
    return sum(values) / len(values) if values else None


def question(sample: dict) -> dict:
    """What a prediction records of its sample (as pipeline.evaluate's predictions do)."""
    return {"key": sample["key"], "answer": sample["answer"],
            "question_type": sample["record"].get("question_type", "all"), "image": sample["pixel_values"] is not None}


def policy_result(predictions: list[dict], policy: str, name: str, model: TokenFlexVLM | None = None) -> dict:
    """score() of predictions that each carry chosen_tokens, plus the mean vision tokens over the
    questions with an image, overall and per question type."""
    result = score(predictions, [p["prediction"] for p in predictions])
    by_type = {}
    for p in predictions:
        if p["image"]:
            by_type.setdefault(p["question_type"], []).append(p["chosen_tokens"])
    chosen = [n for counts in by_type.values() for n in counts]
    return result | {"model": name, "num_vision_tokens": policy, "policy": policy,
                     "mean_vision_tokens": sum(chosen) / len(chosen) if chosen else None,
                     "mean_vision_tokens_by_type": {t: sum(c) / len(c) for t, c in sorted(by_type.items())},
                     **({"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")} if model else {}),
                     "predictions": predictions}


# ---- from every count's answers: fixed rows, the oracle, the policy simulated, calibration ----

def fixed_result(result: dict) -> dict:
    """pipeline.evaluate's result at one N as a policy row: every image question at N."""
    n = result["num_vision_tokens"]
    by_type = {p["question_type"] for p in result["predictions"] if p["image"]}
    return result | {"policy": "fixed", "mean_vision_tokens": n if any(p["image"] for p in result["predictions"]) else None,
                     "mean_vision_tokens_by_type": {t: n for t in sorted(by_type)}}


def ladder_arrays(fixed_results: Sequence[dict], ladder: Sequence[int]) -> dict[str, np.ndarray]:
    """(questions, tries) probabilities and hits, and which questions have an image, from
    pipeline.evaluate's results of one model at each count of the ladder (same samples, in order)."""
    by_n = {r["num_vision_tokens"]: r["predictions"] for r in fixed_results}
    missing = [n for n in ladder if n not in by_n]
    if missing:
        raise ValueError(f"no fixed-N results at {missing} for the ladder {list(ladder)}")
    columns = [by_n[n] for n in ladder]
    if len({tuple(p["key"] for p in c) for c in columns}) != 1:
        raise ValueError("the fixed-N results of the ladder are not over the same samples in the same order")
    return {"probabilities": np.array([[p["probability"] for p in c] for c in columns]).T,
            "hits": np.array([[normalise(p["prediction"]) == normalise(p["answer"]) for p in c] for c in columns]).T,
            "image": np.array([p["image"] for p in columns[0]])}


def simulate(arrays: dict[str, np.ndarray], ladder: Sequence[int], threshold: float) -> dict[str, float]:
    """Accuracy and mean vision tokens the policy would reach at threshold, read off every
    count's answers (what a real run gives, up to batching's float noise)."""
    choice = first_confident(arrays["probabilities"].copy(), threshold)
    hits = arrays["hits"][np.arange(len(choice)), choice]
    tokens = np.array(ladder)[choice][arrays["image"]]
    return {"threshold": threshold, "accuracy": float(hits.mean()),
            "mean_vision_tokens": float(tokens.mean()) if len(tokens) else None}


def calibrate(fixed_results: Sequence[dict], ladder: Sequence[int], max_drop: float) -> dict:
    """The threshold, from validation results at every count of the ladder, with the fewest mean
    vision tokens whose accuracy is at least the best fixed count's minus max_drop (a fraction:
    0.005 is half a point); ties go to the higher accuracy. Every threshold at which a decision
    changes is tried: each probability seen, and infinity (always the last count)."""
    arrays = ladder_arrays(fixed_results, ladder)
    accuracies = arrays["hits"].mean(axis=0)
    best = int(np.argmax(accuracies))  # the first, i.e. the smallest N, among equals
    candidates = [simulate(arrays, ladder, t) for t in sorted(set(arrays["probabilities"].flatten())) + [np.inf]]
    allowed = [c for c in candidates if c["accuracy"] >= accuracies[best] - max_drop - 1e-12]
    chosen = min(allowed, key=lambda c: (c["mean_vision_tokens"] or 0, -c["accuracy"]))
    return {"threshold": float(chosen["threshold"]), "max_drop": max_drop, "samples": len(arrays["hits"]),
            "accuracy": chosen["accuracy"], "mean_vision_tokens": chosen["mean_vision_tokens"],
            "best_fixed_tokens": ladder[best], "best_fixed_accuracy": float(accuracies[best])}


def oracle_result(fixed_results: Sequence[dict], ladder: Sequence[int], name: str) -> dict:
    """Each question at the smallest count of the ladder that answers it right (the smallest
    count when none does), from the fixed-N results."""
    arrays = ladder_arrays(fixed_results, ladder)
    choice = np.where(arrays["hits"].any(axis=1), arrays["hits"].argmax(axis=1), 0)
    by_n = {r["num_vision_tokens"]: r["predictions"] for r in fixed_results}
    predictions = []
    for i, c in enumerate(choice):
        p = by_n[ladder[c]][i]
        predictions.append(p | {"chosen_tokens": ladder[c] if p["image"] else None})
    return policy_result(predictions, "oracle", name)


# ---- model folders on shards ----

def first_samples(model: TokenFlexVLM, shards: str | Path, limit: int | None) -> Iterator[dict]:
    """The first limit samples of shards (all of them when limit is None), streamed."""
    return itertools.islice(iter_samples(shards, model.tokenizer, model.image_processor), limit)


def evaluate_adaptive(model_dirs: Sequence[str | Path], shards: str | Path, ladder: Sequence[int] = DEFAULT_LADDER,
                      threshold: float | None = None, calibration_shards: str | Path | None = None,
                      max_drop: float = 0.005, names: Sequence[str] | None = None, limit: int | None = None,
                      batch_size: int = 8, max_new_tokens: int = 16, device: str | torch.device = "cpu",
                      dtype: str | torch.dtype = "fp32") -> dict:
    """Per model: each count of the ladder as a fixed N, the policy (its threshold given, or
    calibrated on calibration_shards), and the oracle, on the shards. {"shards", "ladder",
    "calibration" (per model, when calibrated), "results": policy rows (fixed, adaptive, oracle)}."""
    if (threshold is None) == (calibration_shards is None):
        raise ValueError(f"give a threshold or validation shards to calibrate one on: exactly one of them, "
                         f"got {'neither' if threshold is None else 'both'}")
    names = names or default_names(model_dirs)
    for path in model_dirs:
        check_ladder(ladder, read_vlm_config(path))
    for folder in [shards] + ([calibration_shards] if calibration_shards else []):
        resolve_source(folder, "--shards")  # fail before any model runs
    results, calibration = [], {}
    for name, path in zip(names, model_dirs, strict=True):
        model = TokenFlexVLM.from_pretrained(path, device, dtype)
        model_threshold = threshold
        if calibration_shards is not None:
            validation = evaluate_model(model, first_samples(model, calibration_shards, limit), list(ladder),
                                        batch_size, max_new_tokens, f"{name} (validation)", total=limit)
            calibration[name] = calibrate(validation, ladder, max_drop)
            model_threshold = calibration[name]["threshold"]
        fixed = evaluate_model(model, first_samples(model, shards, limit), list(ladder), batch_size, max_new_tokens,
                               name, limit)
        adaptive = evaluate_adaptive_model(model, first_samples(model, shards, limit), ladder, model_threshold,
                                           batch_size, max_new_tokens, name, limit)
        rows = [*(fixed_result(r) for r in fixed), adaptive, oracle_result(fixed, ladder, name)]
        results += [dict(r, path=str(path)) for r in rows]
        del model
    return {"shards": str(shards), "limit": limit, "batch_size": batch_size, "ladder": list(ladder),
            "calibration_shards": None if calibration_shards is None else str(calibration_shards),
            "calibration": calibration, "results": results}
