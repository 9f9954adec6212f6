r"""Score model folders on lmms-eval tasks at several vision-token counts N.

    python -m tools.benchmark runs/flex/final runs/fixed256/final --names flex,fixed256 \
        --tasks mme,pope,gqa,textvqa_val --tokens 16,64,144,256 --batch-size 8 --out results/bench

Runs lmms-eval (install it with requirements-eval.txt; see the README) once per model and N, with
the `tokenflex` model at that N. Writes OUT/results.json (lmms-eval's results per task, every
response), OUT/results.md (one table: a row per model and N, a column per task metric, and the
median prefill per batch: vision encoding + prompt forward, the part N changes) and
OUT/scores_vs_tokens.png (each metric and the prefill latency against N, one line per model);
with --model-card, each model's rows also go into its folder's README.md.
Tasks lmms-eval downloads from the Hugging Face hub need the network, or its cache.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from pipeline.model_card import set_evaluation
from tools.options import add_model_options, add_placement_options, model_names, parse_token_counts, placement


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names, e.g. mme,pope")
    parser.add_argument("--tokens", default="16,64,144,256", help="comma-separated N values (default: 16,64,144,256)")
    parser.add_argument("--limit", type=int, help="only the first K documents of each task (for trying things out)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per forward (default: 1)")
    add_placement_options(parser)
    parser.add_argument("--include-path", help="folder of extra lmms-eval task YAMLs (lmms-eval's --include_path)")
    parser.add_argument("--model-card", action="store_true",
                        help="also write each model's rows into its folder's README.md (evaluation section)")
    args = parser.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        parser.error("--limit and --batch-size must be >= 1")
    names = model_names(parser, args)
    device, dtype = placement(parser, args)
    try:
        from pipeline.lmms_eval_model import sweep
    except ModuleNotFoundError as error:
        parser.error(f"{error}: install lmms-eval with `pip install --no-deps -r requirements-eval.txt`")
    tasks = [t for t in args.tasks.split(",") if t]
    try:
        counts = parse_token_counts(args.tokens)
        results = sweep(args.model_dirs, names, tasks, counts, args.limit, args.batch_size, device, dtype,
                        args.include_path)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"tasks": tasks, "limit": args.limit, "batch_size": args.batch_size, "token_counts": counts,
              "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "results.md").write_text(markdown_table(results, args.batch_size))
    plot(results, out / "scores_vs_tokens.png")
    if args.model_card:
        for name, path in zip(names, args.model_dirs):
            set_evaluation(path, markdown_table([r for r in results if r["model"] == name], args.batch_size))
    print((out / "results.md").read_text().rstrip())
    print(f"wrote {out}/results.json, results.md, scores_vs_tokens.png")
    return 0


def metric_names(results):
    return list(dict.fromkeys(metric for r in results for metric in r["scores"]))


def markdown_table(results, batch_size):
    metrics = metric_names(results)
    samples = ", ".join(f"{task} {n}" for task, n in results[0]["samples"].items())
    header = ["model", "N", *metrics, "prefill ms"]
    lines = [f"lmms-eval scores (documents: {samples}); prefill is the median per batch of {batch_size}.\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["model"], str(r["num_vision_tokens"]),
                 *(f"{r['scores'][m]:.4g}" if m in r["scores"] else "-" for m in metrics),
                 "-" if r["prefill_ms"] is None else f"{r['prefill_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """One panel per task metric and one for prefill latency, against N; one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = [*metric_names(results), "prefill ms"]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    ns = sorted({r["num_vision_tokens"] for r in results})
    for ax, panel in zip(axes.flat, panels):
        for model in dict.fromkeys(r["model"] for r in results):
            rows_of_model = [r for r in results if r["model"] == model]
            values = [r["prefill_ms"] if panel == "prefill ms" else r["scores"].get(panel) for r in rows_of_model]
            ax.plot([r["num_vision_tokens"] for r in rows_of_model],
                    [math.nan if v is None else v for v in values], marker="o", label=model)
        ax.set_title(panel if panel != "prefill ms" else "median prefill per batch (ms)", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("vision tokens N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
