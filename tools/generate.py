"""Answer one prompt (with or without an image) from a model folder, at one or several N.

    python -m tools.generate runs/stage2/final --image scene.png --prompt "What colour is the background?" --tokens 64
    python -m tools.generate runs/stage2/final --image scene.png --prompt "..." --tokens 16,64,256

One N prints the answer; several print a table of N, median prefill time (vision encoding +
prompt forward) and answer. N must be a perfect square no larger than the encoder's patch grid.
"""

import argparse
import sys

from PIL import Image

from pipeline.evaluate import answers_at_counts, check_token_count, format_answers, parse_token_counts
from pipeline.model import TokenFlexVLM


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="model folder (from tools.convert_checkpoint or a run's final/)")
    parser.add_argument("--image", help="image file; leave out for a text-only prompt")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--tokens", default="64", help="vision token count(s) N, comma-separated (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens (default: 32)")
    args = parser.parse_args(argv)
    try:
        model = TokenFlexVLM.from_pretrained(args.model_dir)
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"model_dir: {error}")
    try:
        counts = parse_token_counts(args.tokens)
        for n in counts:
            check_token_count(model.config, n)
    except ValueError as error:
        parser.error(f"--tokens: {error}")
    image = None
    if args.image:
        try:
            with Image.open(args.image) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            parser.error(f"--image {args.image}: {error}")
    rows = answers_at_counts(model, image, args.prompt, counts, args.max_new_tokens)
    print(rows[0][2] if len(rows) == 1 else format_answers(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
