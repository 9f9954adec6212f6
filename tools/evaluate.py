r"""Evaluate model folders on held-out shards at several vision-token counts N.

    python -m tools.evaluate runs/flex/final runs/fixed64/final --names flex,fixed64 \
        --shards data/shards/val --tokens 16,36,64,100,144,196,256 --out results/flex-vs-fixed
    python -m tools.evaluate runs/tiled/final --shards data/shards/val --tokens 16,64,144 --tiles 1,4 \
        --out results/tiles

Per model, tile limit and N: exact-match accuracy (overall and per question_type), loss of the
reference answer, vision tokens per image (tiles x N plus row ends), median prefill latency and
vision tokens per second. Multi-turn records are scored on their last question, with the earlier
turns in the prompt. Writes OUT/results.json (with every prediction), OUT/results.md (one table,
a row per model, tile limit and N), OUT/accuracy_vs_tokens.png and OUT/accuracy_vs_tiles.png
(accuracy against vision tokens per image, one curve per model and tile limit).

--tokens adaptive answers each image question at the smallest N of a ladder (--ladder, default
16,64,144,256) whose answer's probability reaches a threshold (pipeline/eval/adaptive.py): --threshold
gives it, or --calibrate VALIDATION_SHARDS picks, on a validation split, the one with the fewest
mean vision tokens within --max-drop points of the best fixed N's accuracy there. The image is
encoded once and re-pooled for each try. Per model it reports each ladder N as a fixed N, the
policy and the oracle (the smallest N that answers right): accuracy and mean vision tokens
overall and per question type, and the total prefill time (every try included); the plot,
accuracy_vs_mean_tokens.png, draws accuracy against mean tokens.

    python -m tools.evaluate runs/demo/model --shards runs/demo/shards/test --tokens adaptive \
        --calibrate runs/demo/shards/validation --out runs/demo/adaptive

On a GPU the models run in bf16 by default (--device, --dtype); results.json records where.
"""

import argparse
import json
import sys
from pathlib import Path

from pipeline.eval.adaptive import DEFAULT_LADDER
from pipeline.eval.adaptive_study import evaluate_adaptive
from pipeline.eval.heldout import evaluate
from tools.options import (
    add_model_options,
    add_placement_options,
    add_tiles_option,
    model_names,
    parse_tile_counts,
    parse_token_counts,
    placement,
)
from tools.report import adaptive_table, markdown_table, plot, plot_adaptive, plot_tiles


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--shards", required=True, help="held-out shards: folder with manifest.json or brace pattern")
    parser.add_argument("--tokens", default="16,36,64,100,144,196,256",
                        help="comma-separated N values, or adaptive (see above)")
    add_tiles_option(parser)
    parser.add_argument("--ladder", default=",".join(map(str, DEFAULT_LADDER)),
                        help="--tokens adaptive: the counts tried, in increasing order (default: %(default)s)")
    parser.add_argument("--threshold", type=float, help="--tokens adaptive: the answer probability that stops")
    parser.add_argument("--calibrate", help="--tokens adaptive: validation shards to pick the threshold on")
    parser.add_argument("--max-drop", type=float, default=0.5,
                        help="--calibrate: accuracy points below the best fixed N allowed (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="evaluate only the first K samples (of each split, with --calibrate)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="longest answer, in tokens (default: 16)")
    add_placement_options(parser)
    args = parser.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--limit, --batch-size and --max-new-tokens must be >= 1")
    names = model_names(parser, args)
    device, dtype = placement(parser, args)
    adaptive = args.tokens.strip() == "adaptive"
    if not adaptive and (args.threshold is not None or args.calibrate):
        parser.error("--threshold and --calibrate go with --tokens adaptive")
    if adaptive and (args.threshold is None) == (args.calibrate is None):
        parser.error("--tokens adaptive needs --threshold or --calibrate VALIDATION_SHARDS (one of them)")
    if adaptive and args.tiles is not None:
        parser.error("--tiles goes with fixed --tokens; --tokens adaptive uses each folder's own tiling")
    try:
        if adaptive:
            report = evaluate_adaptive(args.model_dirs, args.shards, parse_token_counts(args.ladder), args.threshold,
                                       args.calibrate, args.max_drop / 100, names, args.limit, args.batch_size,
                                       args.max_new_tokens, device, dtype)
        else:
            counts, tiles = parse_token_counts(args.tokens), parse_tile_counts(args.tiles)
            report = evaluate(args.model_dirs, args.shards, counts, names, args.limit, args.batch_size,
                              args.max_new_tokens, device, dtype, tiles)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    (write_adaptive if adaptive else write)(report, Path(args.out))
    print((Path(args.out) / "results.md").read_text().rstrip())
    plots = "accuracy_vs_mean_tokens.png" if adaptive else "accuracy_vs_tokens.png, accuracy_vs_tiles.png"
    print(f"wrote {args.out}/results.json, results.md, {plots}")
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


def write_adaptive(report, out_dir):
    """results.json (with every prediction), results.md and accuracy_vs_mean_tokens.png of --tokens adaptive."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "results.md").write_text(adaptive_table(report))
    plot_adaptive(report, out_dir / "accuracy_vs_mean_tokens.png")


if __name__ == "__main__":
    sys.exit(main())
