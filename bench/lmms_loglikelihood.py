"""Multiple-choice scoring speed of the tokenflex lmms-eval model on a seedbench_ppl-style run:
every document one synthetic scene, its question and four choices, each choice scored as the
assistant's reply (TokenFlexVLM.reply_log_likelihoods, what TokenFlexLMMs.loglikelihood calls).

Compared with the work the model did before (one forward per choice, the image encoded again for
every choice), which reply_log_likelihoods does when each choice is given as a document of its
own at batch size 1; then an image encoded once for its four choices at batch size 1 and 8. The
scores of all three must agree. Timings: median and quartiles of --repeats passes after a
warm-up pass.

    python -m bench.lmms_loglikelihood --documents 48 --tokens 64 --repeats 5
    python -m bench.lmms_loglikelihood --model runs/demo/model     # a model folder instead of tiny random-init ones
"""

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from pipeline.model.runtime import latency_ms
from pipeline.model.vlm import TokenFlexVLM
from tools import make_tiny_models
from tools.make_synthetic import render_scene
from tools.synthetic_tasks import OBJECT_PALETTES


def documents(count, image_size, seed=0):
    """(image, prompt, four choices) per document, seedbench_ppl's prompt ("<question> Answer :")."""
    rng = random.Random(seed)
    found = []
    for _ in range(count):
        image, facts = render_scene(rng, image_size)
        obj = rng.choice(list(OBJECT_PALETTES))
        choices = sorted(OBJECT_PALETTES[obj])
        rng.shuffle(choices)
        found.append((image, f"What colour is the {obj}? Answer :", choices))
    return found


def timed(run, repeats):
    run()  # warm-up
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - started)
    return latency_ms(seconds), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model folder (default: tiny random-init models, built here)")
    parser.add_argument("--documents", type=int, default=48, help="four-choice documents (default: 48)")
    parser.add_argument("--tokens", type=int, default=64, help="vision tokens N (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per setting (default: 5)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        if args.model:
            model = TokenFlexVLM.from_pretrained(args.model).eval()
        else:
            make_tiny_models.main([str(Path(tmp) / "tiny")])
            torch.manual_seed(0)
            model = TokenFlexVLM.from_components(Path(tmp) / "tiny" / "vision", Path(tmp) / "tiny" / "qwen2").eval()
        docs = documents(args.documents, model.image_processor.size["height"])
        images, prompts, choices = zip(*docs)
        per_choice = ([image for image, _, c in docs for _ in c], [prompt for _, prompt, c in docs for _ in c],
                      [[choice] for _, _, c in docs for choice in c])
        settings = [
            ("before: one forward per choice, the image encoded for each", per_choice, 1),
            ("image encoded once per document, batch size 1", (images, prompts, choices), 1),
            ("image encoded once per document, batch size 8", (images, prompts, choices), 8),
        ]
        rows, reference = [], None
        for name, (setting_images, setting_prompts, setting_choices), batch_size in settings:
            latency, scores = timed(lambda: model.reply_log_likelihoods(
                setting_images, setting_prompts, setting_choices, args.tokens, batch_size), args.repeats)
            flat = [score for document in scores for score, _ in document]
            reference = reference or flat
            difference = max(abs(a - b) for a, b in zip(flat, reference, strict=True))
            rows.append((name, latency, difference))
            print(f"{name}: {latency['median'] / 1000:.3f} s per pass", flush=True)

    choices_total = sum(len(c) for c in choices)
    print(f"{args.documents} documents x 4 choices, N={args.tokens}, "
          f"{'model ' + str(args.model) if args.model else 'tiny random-init models (tools.make_tiny_models)'}, "
          f"torch {torch.__version__} on {torch.get_num_threads()} CPU threads; median (q1–q3) of "
          f"{args.repeats} passes after a warm-up\n")
    print("| setting | seconds per pass | choices/s | speed-up | largest score difference |\n|---|---|---|---|---|")
    before = rows[0][1]["median"]
    for name, latency, difference in rows:
        print(
            f"| {name} | {latency['median'] / 1000:.3f} ({latency['q1'] / 1000:.3f}–{latency['q3'] / 1000:.3f}) | "
            f"{choices_total / latency['median'] * 1000:.0f} | {before / latency['median']:.2f}x | {difference:.2g} |"
        )


if __name__ == "__main__":
    main()
