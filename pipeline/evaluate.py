"""Answers, accuracy, loss and prefill latency of model folders at several vision-token counts.

Each held-out sample is read once (iter_samples, not resampled). Multi-turn records are scored
on their LAST question: the prompt holds every earlier turn (with the reference replies), the
model generates the last reply, and the loss is the cross-entropy of that reference reply
only. The synthetic records' question_type is the type of that last question.

Per model and N: exact-match accuracy (answers normalised: stripped, lower-cased, trailing
punctuation dropped) overall and per question type, mean loss per answer token, median prefill
seconds per batch (vision encoding + prompt forward, the part N changes) and vision-token
throughput (images x N / prefill seconds, over all batches).

Also here: the forward-batch builder the converter's probe uses, and the several-N answer
table behind tools/generate.
"""

import itertools
import json
import math
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.chat import IGNORE_INDEX, expand_image_markers
from pipeline.data import iter_samples, resolve_shards
from pipeline.model import TokenFlexVLM, read_vlm_config
from pipeline.projector import pooled_side

TRAILING_PUNCTUATION = ".,;:!?"


def normalise(answer):
    return answer.strip().lower().rstrip(TRAILING_PUNCTUATION).strip()


def grid_side(config):
    """Side of the vision tower's square patch grid, from the model's recorded config."""
    vision = config.vision_config
    if "image_size" not in vision or "patch_size" not in vision:
        raise ValueError("the model's vision_config has no image_size/patch_size: can't tell its patch grid")
    return vision["image_size"] // vision["patch_size"]


def check_token_count(config, num_vision_tokens):
    """ValueError unless N is a perfect square whose side fits the encoder's patch grid."""
    pooled_side(num_vision_tokens, grid_side(config))


def parse_token_counts(text):
    """'16,64,256' -> [16, 64, 256] (ValueError on anything else)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"token counts must be comma-separated integers, got {text!r}") from None
    if not counts:
        raise ValueError("no token counts given")
    return counts


# ---- batches ----

def labelled_batch(model, samples, num_vision_tokens):
    """A forward batch as training builds one (markers expanded to N slots, per-sequence
    position_ids, real images flagged in image_mask), one sample per right-padded row.

    samples: dicts with input_ids, labels and pixel_values ((1, 3, H, W) or None). Right
    padding needs no attention mask: under causal attention no real token sees a pad.
    """
    rows = [expand_image_markers(s["input_ids"], s["labels"], model.config.image_token_id, num_vision_tokens)
            for s in samples]
    width = max(len(ids) for ids, _ in rows)
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([labs + [IGNORE_INDEX] * (width - len(labs)) for _, labs in rows])
    pixel_values, image_mask = batch_images(model, samples)
    return {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(width).expand(len(rows), -1),
            "pixel_values": pixel_values, "image_mask": image_mask}


def batch_images(model, samples):
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return model.image_inputs(torch.cat(images) if images else None)


def last_reply_labels(sample):
    """The sample's labels with everything before its last reply masked: only the answer is scored."""
    prompt = sample["prompt_ids"]
    if sample["input_ids"][:len(prompt)] != prompt:
        raise ValueError(f"sample {sample['key']} in {sample['shard']}: its prompt is not a prefix of its tokens")
    return [IGNORE_INDEX] * len(prompt) + sample["labels"][len(prompt):]


def prompt_inputs(model, samples, num_vision_tokens):
    """Left-padded prompt embeddings and attention mask of samples whose prompts hold earlier turns."""
    pixel_values, image_mask = batch_images(model, samples)
    return model.prompt_embeddings([s["prompt_ids"] for s in samples], pixel_values, image_mask, num_vision_tokens)


@torch.no_grad()
def evaluate_batch(model, samples, num_vision_tokens, max_new_tokens):
    """(answers, prefill seconds, loss summed over answer tokens, answer tokens) for one batch."""
    embeds, attention_mask, seconds = model.timed_prefill(lambda: prompt_inputs(model, samples, num_vision_tokens))
    answers = model.generate_from(embeds, attention_mask, max_new_tokens)

    scored = [dict(s, labels=last_reply_labels(s)) for s in samples]
    batch = labelled_batch(model, scored, num_vision_tokens)
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = model(batch, num_vision_tokens).loss
    return answers, seconds, float(loss) * tokens, tokens


# ---- evaluation ----

def batches_of(samples, batch_size):
    samples = iter(samples)
    while batch := list(itertools.islice(samples, batch_size)):
        yield batch


def evaluate_model(model, samples, counts, batch_size=8, max_new_tokens=16, name="model", total=None):
    """One result dict per N (see the module docstring) with the per-sample predictions.

    samples: an iterable of iter_samples items, streamed: only one batch of images is held at
    a time, and every N sees each batch before the next one is read. total: for the progress bar.
    """
    model.eval()
    for n in counts:
        check_token_count(model.config, n)
    seen = []
    runs = {n: {"answers": [], "seconds": [], "loss_sum": 0.0, "loss_tokens": 0, "images": 0} for n in counts}
    progress = tqdm(total=total, desc=f"evaluating {name}", unit="sample")
    for batch in batches_of(samples, batch_size):
        if not seen:  # one untimed sample first: the first forward pays for allocation and set-up
            evaluate_batch(model, batch[:1], counts[0], 1)
        seen += [{"key": s["key"], "answer": s["answer"], "question_type": s["record"].get("question_type", "all")}
                 for s in batch]
        for n, run in runs.items():
            answers, seconds, loss_sum, loss_tokens = evaluate_batch(model, batch, n, max_new_tokens)
            run["answers"] += answers
            run["seconds"].append(seconds)
            run["loss_sum"] += loss_sum
            run["loss_tokens"] += loss_tokens
            run["images"] += sum(s["pixel_values"] is not None for s in batch)
        progress.update(len(batch))
    progress.close()
    if not seen:
        raise ValueError("no usable samples to evaluate")
    return [score(seen, run["answers"]) | {
        "model": name, "num_vision_tokens": n,
        "loss": run["loss_sum"] / run["loss_tokens"] if run["loss_tokens"] else None,
        "prefill_ms": 1000 * statistics.median(run["seconds"]),
        "vision_tokens_per_s": run["images"] * n / sum(run["seconds"]),
        "predictions": [dict(s, prediction=a) for s, a in zip(seen, run["answers"])],
    } for n, run in runs.items()]


def score(samples, answers):
    """Exact-match accuracy of answers against samples' reference answers, overall and per question_type."""
    hits = [normalise(a) == normalise(s["answer"]) for s, a in zip(samples, answers, strict=True)]
    by_type = {}
    for sample, hit in zip(samples, hits):
        by_type.setdefault(sample["question_type"], []).append(hit)
    return {"samples": len(hits), "accuracy": sum(hits) / len(hits),
            "accuracy_by_type": {t: sum(h) / len(h) for t, h in sorted(by_type.items())},
            "samples_by_type": {t: len(h) for t, h in sorted(by_type.items())}}


def evaluate(model_dirs, shards, counts, out_dir, names=None, limit=None, batch_size=8, max_new_tokens=16):
    """Evaluate every model at every N; write results.json, results.md and accuracy_vs_tokens.png."""
    names = names or default_names(model_dirs)
    if len(names) != len(model_dirs):
        raise ValueError(f"{len(names)} names (--names) for {len(model_dirs)} model folders")
    resolve_shards(shards)  # fail before any model runs
    for path in model_dirs:
        for n in counts:
            check_token_count(read_vlm_config(path), n)
    results = []
    for name, path in zip(names, model_dirs):
        model = TokenFlexVLM.from_pretrained(path)
        samples = itertools.islice(iter_samples(shards, model.tokenizer, model.image_processor), limit)
        for result in evaluate_model(model, samples, counts, batch_size, max_new_tokens, name, total=limit):
            results.append(dict(result, path=str(path)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"shards": str(shards), "limit": limit, "batch_size": batch_size, "token_counts": list(counts),
              "results": results}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    caption = (f"Exact-match accuracy on {results[0]['samples']} samples of {shards}; loss per answer token; prefill is the "
               f"median per batch of {batch_size}.\n\n")
    (out_dir / "results.md").write_text(caption + markdown_table(results))
    plot(results, out_dir / "accuracy_vs_tokens.png")
    return report


def default_names(model_dirs):
    names = [Path(p).name for p in model_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in model_dirs]


def markdown_table(results):
    types = sorted({t for r in results for t in r["accuracy_by_type"]})
    counts = {t: max(r["samples_by_type"].get(t, 0) for r in results) for t in types}
    header = ["model", "N", "accuracy", *(f"{t} (n={counts[t]})" for t in types), "loss", "prefill ms",
              "vision tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["model"], str(r["num_vision_tokens"]), f"{r['accuracy']:.3f}",
                 *(f"{r['accuracy_by_type'][t]:.3f}" if t in r["accuracy_by_type"] else "-" for t in types),
                 "-" if r["loss"] is None else f"{r['loss']:.4f}", f"{r['prefill_ms']:.2f}",
                 f"{r['vision_tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Accuracy per question type vs N (left) and prefill latency vs N (right); colour is the
    question type, line style the model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    models = list(dict.fromkeys(r["model"] for r in results))
    types = ["overall", *sorted({t for r in results for t in r["accuracy_by_type"]})]
    styles = dict(zip(models, ["-", "--", ":", "-."] * len(models)))
    colours = dict(zip(types, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(types)))
    ns = sorted({r["num_vision_tokens"] for r in results})
    fig, (accuracy_ax, latency_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model in models:
        rows = [r for r in results if r["model"] == model]
        x = [r["num_vision_tokens"] for r in rows]
        for t in types:
            y = [r["accuracy"] if t == "overall" else r["accuracy_by_type"].get(t, math.nan) for r in rows]
            accuracy_ax.plot(x, y, styles[model], marker="o", color=colours[t], linewidth=2.5 if t == "overall" else 1.2)
        latency_ax.plot(x, [r["prefill_ms"] for r in rows], styles[model], marker="o", color="black")
    type_handles = [Line2D([], [], color=colours[t], label=t) for t in types]
    model_handles = [Line2D([], [], color="gray", linestyle=styles[m], label=m) for m in models]
    accuracy_ax.legend(handles=type_handles + model_handles, fontsize=8)
    latency_ax.legend(handles=[Line2D([], [], color="black", linestyle=styles[m], label=m) for m in models], fontsize=8)
    for ax, ylabel in ((accuracy_ax, "exact-match accuracy"), (latency_ax, "median prefill per batch (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("vision tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    accuracy_ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- single-prompt inference (tools/generate) ----

def answers_at_counts(model, image, prompt, counts, max_new_tokens=32, repeats=3):
    """[(N, median prefill seconds, answer)] for one image (or None) and prompt at each N."""
    for n in counts:
        check_token_count(model.config, n)
    model.eval()
    images, prompts = [image], [prompt]
    model.prefill_seconds(images, prompts, counts[0])  # untimed warm-up
    rows = []
    for n in tqdm(counts, desc="generating", unit="N", disable=len(counts) == 1):
        seconds = statistics.median(model.prefill_seconds(images, prompts, n) for _ in range(repeats))
        rows.append((n, seconds, model.generate(images, prompts, n, max_new_tokens)[0]))
    return rows


def format_answers(rows):
    """An aligned text table: N, prefill ms, answer."""
    cells = [("N", "prefill ms", "answer")] + [(str(n), f"{1000 * s:.2f}", a or "(empty)") for n, s, a in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(2)]
    return "\n".join(f"{n:>{widths[0]}}  {ms:>{widths[1]}}  {answer}" for n, ms, answer in cells)
