"""Adaptive N measured: its threshold calibrated on a validation split, the policy evaluated on a
test split beside every fixed N of its ladder and the oracle.

The threshold (calibrate): from each count's answers and their probabilities on the validation
split, the one with the fewest mean vision tokens whose accuracy is within max_drop of the best
fixed count's. The oracle (oracle_result) answers each question at the smallest count that
answers it right (at the smallest count when none does): no policy over the ladder can be more
accurate, or cheaper at that accuracy. Mean vision tokens are over the questions with an image;
accuracy is over all of them.
"""

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import iter_samples
from pipeline.data.mixture import resolve_source
from pipeline.eval.adaptive import DEFAULT_LADDER, adaptive_generate, check_ladder, first_confident, mean_over_images
from pipeline.eval.heldout import batches_of, default_names, evaluate_model, normalise, score
from pipeline.model.folder import read_vlm_config
from pipeline.model.runtime import prefill_summary
from pipeline.model.vlm import TokenFlexVLM


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


def question(sample: dict) -> dict:
    """What a prediction records of its sample (as pipeline.eval.heldout's predictions do)."""
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
    return result | {
        "model": name,
        "num_vision_tokens": policy,
        "policy": policy,
        "mean_vision_tokens": sum(chosen) / len(chosen) if chosen else None,
        "mean_vision_tokens_by_type": {t: sum(c) / len(c) for t, c in sorted(by_type.items())},
        **({"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")} if model else {}),
        "predictions": predictions,
    }


def fixed_result(result: dict) -> dict:
    """pipeline.eval.heldout's result at one N as a policy row: every image question at N."""
    n = result["num_vision_tokens"]
    by_type = {p["question_type"] for p in result["predictions"] if p["image"]}
    return result | {
        "policy": "fixed",
        "mean_vision_tokens": n if any(p["image"] for p in result["predictions"]) else None,
        "mean_vision_tokens_by_type": {t: n for t in sorted(by_type)},
    }


def ladder_arrays(fixed_results: Sequence[dict], ladder: Sequence[int]) -> dict[str, np.ndarray]:
    """(questions, tries) probabilities and hits, and which questions have an image, from
    pipeline.eval.heldout's results of one model at each count of the ladder (same samples, in order)."""
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
