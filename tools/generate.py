"""Answer one prompt (with or without an image) from a model folder, at one or several N.

    python -m tools.generate runs/stage2/final --image scene.png --prompt "What colour is the background?" --tokens 64
    python -m tools.generate runs/stage2/final --image scene.png --prompt "..." --tokens 16,64,256

One N prints the answer; several print a table of N, median prefill time (vision encoding +
prompt forward) and answer. N must be a perfect square n*n (n >= 1) no larger than the encoder's patch grid.
On a GPU the model runs in bf16 by default (--device, --dtype).
"""

import argparse
import statistics
import sys

from PIL import Image
from tqdm import tqdm

from pipeline.model import TokenFlexVLM
from tools.options import add_placement_options, parse_token_counts, placement


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="model folder (from tools.convert_checkpoint or a run's final/)")
    parser.add_argument("--image", help="image file; leave out for a text-only prompt")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--tokens", default="64", help="vision token count(s) N, comma-separated (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens (default: 32)")
    add_placement_options(parser)
    args = parser.parse_args(argv)
    device, dtype = placement(parser, args)
    try:
        model = TokenFlexVLM.from_pretrained(args.model_dir, device, dtype)
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"model_dir: {error}")
    try:
        counts = parse_token_counts(args.tokens)
        for n in counts:
            model.config.check_token_count(n)
    except ValueError as error:
        parser.error(f"--tokens: {error}")
    image = None
    if args.image:
        try:
            with Image.open(args.image) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            parser.error(f"--image {args.image}: {error}")
    print(f"{args.model_dir} on {model.device} in {str(model.dtype).removeprefix('torch.')}", file=sys.stderr)
    rows = answers_at_counts(model, image, args.prompt, counts, args.max_new_tokens)
    print(rows[0][2] if len(rows) == 1 else format_answers(rows))
    return 0


def answers_at_counts(model, image, prompt, counts, max_new_tokens=32, repeats=3):
    """[(N, median prefill seconds of `repeats` after a warm-up, answer)] for one image (or None)
    and prompt at each N."""
    model.eval()
    images, prompts = [image], [prompt]
    rows = []
    for n in tqdm(counts, desc="generating", unit="N", disable=len(counts) == 1):
        seconds = statistics.median(model.prefill_repeats(images, prompts, n, repeats))
        rows.append((n, seconds, model.generate(images, prompts, n, max_new_tokens)[0]))
    return rows


def format_answers(rows):
    """An aligned text table: N, prefill ms, answer."""
    cells = [("N", "prefill ms", "answer")] + [(str(n), f"{1000 * s:.2f}", a or "(empty)") for n, s, a in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(2)]
    return "\n".join(f"{n:>{widths[0]}}  {ms:>{widths[1]}}  {answer}" for n, ms, answer in cells)


if __name__ == "__main__":
    sys.exit(main())
