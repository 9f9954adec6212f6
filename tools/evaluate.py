r"""Evaluate model folders on held-out shards at several vision-token counts N.

    python -m tools.evaluate runs/flex/final runs/fixed64/final --names flex,fixed64 \
        --shards data/shards/val --tokens 16,36,64,100,144,196,256 --out results/flex-vs-fixed
    python -m tools.evaluate runs/tiled/final --shards data/shards/val --tokens 16,64,144 --tiles 1,4 --out results/tiles

Per model, tile limit and N: exact-match accuracy (overall and per question_type), loss of the
reference answer, vision tokens per image (tiles x N plus row ends), median prefill latency and
vision tokens per second. Multi-turn records are scored on their last question, with the earlier
turns in the prompt. Writes OUT/results.json (with every prediction), OUT/results.md (one table,
a row per model, tile limit and N), OUT/accuracy_vs_tokens.png and OUT/accuracy_vs_tiles.png
(accuracy against vision tokens per image, one curve per model and tile limit).

On a GPU the models run in bf16 by default (--device, --dtype); results.json records where.
"""

import argparse
import json
import sys
from pathlib import Path

from pipeline.evaluate import evaluate
from tools.options import (
    add_model_options,
    add_placement_options,
    add_tiles_option,
    model_names,
    parse_tile_counts,
    parse_token_counts,
    placement,
)
from tools.report import markdown_table, plot, plot_tiles


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--shards", required=True, help="held-out shards: folder with manifest.json or brace pattern")
    parser.add_argument("--tokens", default="16,36,64,100,144,196,256", help="comma-separated N values")
    add_tiles_option(parser)
    parser.add_argument("--limit", type=int, help="evaluate only the first K samples")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="longest answer, in tokens (default: 16)")
    add_placement_options(parser)
    args = parser.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--limit, --batch-size and --max-new-tokens must be >= 1")
    names = model_names(parser, args)
    device, dtype = placement(parser, args)
    try:
        counts, tiles = parse_token_counts(args.tokens), parse_tile_counts(args.tiles)
        report = evaluate(args.model_dirs, args.shards, counts, names, args.limit, args.batch_size,
                          args.max_new_tokens, device, dtype, tiles)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    write(report, Path(args.out))
    print((Path(args.out) / "results.md").read_text().rstrip())
    print(f"wrote {args.out}/results.json, results.md, accuracy_vs_tokens.png, accuracy_vs_tiles.png")
    return 0


def write(report, out_dir):
    """results.json (with every prediction), results.md, accuracy_vs_tokens.png and accuracy_vs_tiles.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    results = report["results"]
    caption = (f"Exact-match accuracy on {results[0]['samples']} samples of {report['shards']}; loss per answer "
               f"token; prefill is the median per batch of {report['batch_size']}, on {results[0]['device']} in "
               f"{results[0]['dtype']}.\n\n")
    (out_dir / "results.md").write_text(caption + markdown_table(results))
    plot(results, out_dir / "accuracy_vs_tokens.png")
    plot_tiles(results, out_dir / "accuracy_vs_tiles.png")


if __name__ == "__main__":
    sys.exit(main())
