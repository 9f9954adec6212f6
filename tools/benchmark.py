r"""Score model folders on lmms-eval tasks at several vision-token counts N.

    python -m tools.benchmark runs/flex/final runs/fixed256/final --names flex,fixed256 \
        --tasks mme,pope,gqa,textvqa_val --tokens 16,64,144,256 --batch-size 8 --out results/bench
    python -m tools.benchmark runs/tiled/final --tasks mme --tokens 64,144 --tiles 1,6 --out results/bench-tiles

Runs lmms-eval (install it with requirements-eval.txt; see docs/evaluation.md) once per model, tile limit
(--tiles; default: the folder's own), N and task, with the `tokenflex` model at those, then times
the prefill (vision encoding + prompt forward, the part N and tiles change) of one probe batch:
--batch-size prompts with an image each (as many tower inputs wide as the tile limit),
--timing-repeats times after a warm-up. With several tile limits, each row's model name says its
limit ("name tiles=T"). Writes, and rewrites as each (model, N) finishes, OUT/results.json
(lmms-eval's results per task, every response, every timing), OUT/results.md (one table: a row per
model and N, a column per task metric, the prefill's median and quartiles) and
OUT/scores_vs_tokens.png (each metric and the prefill latency against N, one line per model);
with --model-card, each model's rows also go into its folder's README.md.

A task that fails stops the sweep: the message names the model, N and task, the results
finished so far stay in OUT (results.json also keeps the traceback), and the exit code is 1.
Tasks lmms-eval downloads from the Hugging Face hub need the network, or its cache; see
docs/evaluation.md for tasks pointed at local data.
"""

import argparse
import json
import sys
import traceback
from pathlib import Path

from pipeline.export.model_card import set_evaluation
from tools.options import (
    add_model_options,
    add_placement_options,
    add_tiles_option,
    model_names,
    parse_tile_counts,
    parse_token_counts,
    placement,
)
from tools.report import benchmark_table, plot_benchmark

FAILED = 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names, e.g. mme,pope")
    parser.add_argument("--tokens", default="16,64,144,256", help="comma-separated N values (default: 16,64,144,256)")
    add_tiles_option(parser)
    parser.add_argument("--limit", type=int, help="only the first K documents of each task (for trying things out)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per forward (default: 1)")
    parser.add_argument("--timing-repeats", type=int, default=5,
                        help="timed prefills of the probe batch per model and N, after a warm-up (default: 5)")
    add_placement_options(parser)
    parser.add_argument("--include-path", help="folder of extra lmms-eval task YAMLs (lmms-eval's --include_path)")
    parser.add_argument("--model-card", action="store_true",
                        help="also write each model's rows into its folder's README.md (evaluation section)")
    args = parser.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1 or args.timing_repeats < 1:
        parser.error("--limit, --batch-size and --timing-repeats must be >= 1")
    names = model_names(parser, args)
    device, dtype = placement(parser, args)
    try:
        from pipeline.eval.lmms_eval_sweep import SweepError, sweep
    except ModuleNotFoundError as error:
        parser.error(f"{error}: install lmms-eval with `pip install --no-deps -r requirements-eval.txt`")
    tasks = [t for t in args.tasks.split(",") if t]
    out = Path(args.out)
    report = {"tasks": tasks, "limit": args.limit, "batch_size": args.batch_size,
              "timing_repeats": args.timing_repeats, "results": []}
    try:
        report["token_counts"], report["tile_counts"] = parse_token_counts(args.tokens), parse_tile_counts(args.tiles)
        results = sweep(args.model_dirs, names, tasks, report["token_counts"], args.limit, args.batch_size, device,
                        dtype, args.include_path, args.timing_repeats, report["tile_counts"])
        for result in results:
            report["results"].append(result)
            write(report, out, names, args.model_dirs, args.model_card)
    except (ValueError, FileNotFoundError) as error:  # checked before any model runs
        parser.error(str(error))
    except SweepError as error:
        report["failure"] = {"model": error.result["model"], "num_vision_tokens": error.result["num_vision_tokens"],
                             "task": error.task, "error": f"{type(error.error).__name__}: {error.error}",
                             "traceback": "".join(traceback.format_exception(error.error))}
        if error.result["scores"]:  # the tasks it finished
            report["results"].append(error.result)
        write(report, out, names, args.model_dirs, args.model_card)
        grouped = args.limit and isinstance(error.error, AssertionError)
        hint = (f" With --limit {args.limit}: a task that scores groups of documents (MME scores each image's "
                f"question pair) needs a limit that keeps whole groups." if grouped else "")
        print(f"tools.benchmark: {error}.{hint}\nThe results finished before it are in {out}/results.json and "
              f"results.md; results.json also holds the traceback.", file=sys.stderr)
        return FAILED
    print((out / "results.md").read_text().rstrip())
    print(f"wrote {out}/results.json, results.md, scores_vs_tokens.png")
    return 0


def write(report, out, names, model_dirs, model_card):
    """results.json, results.md and the plot for the results so far; with model_card, each model's rows."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "results.md").write_text(benchmark_table(report))
    if report["results"]:
        plot_benchmark(report["results"], out / "scores_vs_tokens.png")
    if model_card:
        for name, path in zip(names, model_dirs):
            rows = [r for r in report["results"] if r["model"] == name]
            if rows:
                set_evaluation(path, benchmark_table(dict(report, results=rows)))


if __name__ == "__main__":
    sys.exit(main())
