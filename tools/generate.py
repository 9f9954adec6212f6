"""Answer one prompt (with no, one or several images) from a model folder, at one or several N.

    python -m tools.generate runs/stage2/final --image scene.png --prompt "What colour is the background?" --tokens 64
    python -m tools.generate runs/stage2/final --image scene.png --prompt "..." --tokens 16,64,256
    python -m tools.generate runs/stage2/final --image a.png --image b.png --prompt "Same colour?" --tiles 4

Each --image adds an image marker (and a newline) before the prompt, in the order given. --tiles:
at most this many tiles per image (pipeline/model/tiles.py; default: what the folder records;
several images take at most its multi-image limit each). One N prints the answer; several print
a table of N, median prefill time (vision encoding + prompt forward) and answer. N must be a
perfect square n*n (n >= 1) no larger than the encoder's patch grid.
On a GPU the model runs in bf16 by default (--device, --dtype).
"""

import argparse
import statistics
import sys

from PIL import Image
from tqdm import tqdm

from pipeline.model.vlm import TokenFlexVLM
from tools.options import add_placement_options, parse_token_counts, placement


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="model folder (from tools.convert_checkpoint or a run's final/)")
    parser.add_argument("--image", action="append", default=[],
                        help="image file; repeat for several images, in order; leave out for a text-only prompt")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--tokens", default="64", help="vision token count(s) N, comma-separated (default: 64)")
    parser.add_argument(
        "--tiles", type=int, help="at most this many tiles per image (default: the folder's data.max_tiles)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens (default: 32)")
    add_placement_options(parser)
    args = parser.parse_args(argv)
    if args.tiles is not None and args.tiles < 1:
        parser.error("--tiles must be >= 1")
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
    images = []
    for path in args.image:
        try:
            with Image.open(path) as opened:
                images.append(opened.convert("RGB"))
        except OSError as error:
            parser.error(f"--image {path}: {error}")
    print(f"{args.model_dir} on {model.device} in {str(model.dtype).removeprefix('torch.')}", file=sys.stderr)
    rows = answers_at_counts(model, images, args.prompt, counts, args.max_new_tokens, max_tiles=args.tiles)
    print(rows[0][2] if len(rows) == 1 else format_answers(rows))
    return 0


def answers_at_counts(model, images, prompt, counts, max_new_tokens=32, repeats=3, max_tiles=None):
    """[(N, median prefill seconds of `repeats` after a warm-up, answer)] for one prompt and its
    images (none, one, or a list) at each N, at most max_tiles tiles per image (None: the folder's)."""
    model.eval()
    images, prompts = [images], [prompt]
    rows = []
    for n in tqdm(counts, desc="generating", unit="N", disable=len(counts) == 1):
        seconds = statistics.median(model.prefill_repeats(images, prompts, n, repeats, max_tiles))
        rows.append((n, seconds, model.generate(images, prompts, n, max_new_tokens, max_tiles)[0]))
    return rows


def format_answers(rows):
    """An aligned text table: N, prefill ms, answer."""
    cells = [("N", "prefill ms", "answer")] + [(str(n), f"{1000 * s:.2f}", a or "(empty)") for n, s, a in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(2)]
    return "\n".join(f"{n:>{widths[0]}}  {ms:>{widths[1]}}  {answer}" for n, ms, answer in cells)


if __name__ == "__main__":
    sys.exit(main())
