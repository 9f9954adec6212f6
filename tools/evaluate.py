r"""Evaluate model folders on held-out shards at several vision-token counts N.

    python -m tools.evaluate runs/flex/final runs/fixed64/final --names flex,fixed64 \
        --shards data/shards/val --tokens 16,36,64,100,144,196,256 --out results/flex-vs-fixed

Per model and N: exact-match accuracy (overall and per question_type), loss of the reference
answer, median prefill latency and vision tokens per second. Multi-turn records are scored on
their last question, with the earlier turns in the prompt. Writes OUT/results.json (with every
prediction), OUT/results.md (one table, a row per model and N) and OUT/accuracy_vs_tokens.png.
"""

import argparse
import sys
from pathlib import Path

from pipeline.evaluate import evaluate, parse_token_counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+", help="model folders to compare")
    parser.add_argument("--shards", required=True, help="held-out shards: folder with manifest.json or brace pattern")
    parser.add_argument("--tokens", default="16,36,64,100,144,196,256", help="comma-separated N values")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--names", help="comma-separated model names for the table and plot (default: folder names)")
    parser.add_argument("--limit", type=int, help="evaluate only the first K samples")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="longest answer, in tokens (default: 16)")
    args = parser.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--limit, --batch-size and --max-new-tokens must be >= 1")
    names = args.names.split(",") if args.names else None
    try:
        counts = parse_token_counts(args.tokens)
        evaluate(args.model_dirs, args.shards, counts, args.out, names, args.limit, args.batch_size,
                 args.max_new_tokens)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(Path(args.out, "results.md").read_text().rstrip())
    print(f"wrote {args.out}/results.json, results.md, accuracy_vs_tokens.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
