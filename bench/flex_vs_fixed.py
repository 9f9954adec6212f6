"""Does flexibility pay? One TokenFLEX model against fixed-N specialists, on the tiny CPU models.

Trains, with the demo's recipe (configs/tiny_cpu_stage{1,2}.yaml, both stages, 2 ranks):
  flex         tokens.counts {16: 1, 64: 1, 144: 1}: N drawn per optimizer step
  fixed16/64/144  one specialist per count
  flex-resize  flex with the projector's resize_avg pooling (bilinear resize to a multiple of n,
               then average) instead of adaptive average pooling
every model on the same data, with the same seeds (train, data and tokens seed = the run's seed)
and the same number of training samples: the flex model runs the configs' step counts, and a
specialist runs as many steps as that many samples take at its N (its steps pack more or fewer
samples), measured with the project's packer on the training shards before training. Then every
model is evaluated (pipeline.evaluate) on the held-out shards at N = 16, 36, 64, 100, 144, 196 and
256 (36, 100, 196 and 256 are seen by none of them), and the results are summarised as mean and
spread (half the range) over seeds, per question type, with the questions of the study answered.

    python -m bench.flex_vs_fixed --write-results   # the study (about 45 min on 2 CPU cores)
    python -m bench.flex_vs_fixed --quick           # minutes: 2 models, 1 seed, a few steps (tests)

Writes OUT/results.md, OUT/results.json and OUT/accuracy_vs_tokens.png; --write-results also
copies them to bench/flex_vs_fixed_results.{md,json} and bench/flex_vs_fixed_accuracy.png.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.data import TrainBatches
from pipeline.evaluate import evaluate
from pipeline.model import TokenFlexVLM
from tools.demo import REPO, cpu_training_env, make_models_and_data, run, stage_command

FLEX = {16: 1, 64: 1, 144: 1}
MODELS = {  # name: (tokens.counts, projector pooling)
    "flex": (FLEX, "adaptive"),
    "fixed16": ({16: 1}, "adaptive"),
    "fixed64": ({64: 1}, "adaptive"),
    "fixed144": ({144: 1}, "adaptive"),
    "flex-resize": (FLEX, "resize_avg"),
}
EVAL_COUNTS = [16, 36, 64, 100, 144, 196, 256]
TYPES = ["overall", "coarse", "medium", "fine", "text"]
RESULTS = {".md": REPO / "bench" / "flex_vs_fixed_results.md", ".json": REPO / "bench" / "flex_vs_fixed_results.json",
           ".png": REPO / "bench" / "flex_vs_fixed_accuracy.png"}
PACKER_BATCHES = 30  # batches per rank and N for measuring samples per step
QUICK = {"steps": {1: 2, 2: 4}, "packer_batches": 4}


def stage_config(stage):
    return REPO / "configs" / f"tiny_cpu_stage{stage}.yaml"


def samples_per_step(data_root, counts, ranks, batches=PACKER_BATCHES):
    """Mean samples one optimizer step packs (all ranks) at each N, from the training config's
    packer (pipeline.data.TrainBatches) on the training shards; nothing trains."""
    cfg = load_config(stage_config(2), [f"data.shards={data_root / 'shards' / 'train'}"])
    model = TokenFlexVLM.from_components(data_root / "tiny" / "vision", data_root / "tiny" / "qwen2")
    per_n = {}
    for n in counts:
        total = 0
        for rank in range(ranks):
            stream = TrainBatches(cfg.data, model.tokenizer, model.image_processor, rank, ranks)
            total += sum(stream.next_batch(n)["stats"]["num_samples"] for _ in range(batches))
        per_n[n] = total / batches
    return per_n


def mean_samples(per_n, counts):
    weights = sum(counts.values())
    return sum(per_n[n] * w for n, w in counts.items()) / weights


def scaled_steps(base_steps, per_n, counts):
    """Steps that see as many samples at `counts` as base_steps do at the flex mix."""
    return max(1, round(base_steps * mean_samples(per_n, FLEX) / mean_samples(per_n, counts)))


def samples_seen(output_dir):
    """Training samples over all ranks, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return round(sum(r["samples_per_s"] * r["step_time_s"] for r in rows))


def train(name, seed, data_root, runs, steps, ranks, env):
    """Stage 1 then stage 2 of one model; returns its final model folder and samples seen."""
    counts, pooling = MODELS[name]
    run_dir = runs / f"{name}-seed{seed}"
    counts_yaml = "{" + ", ".join(f"{n}: {w}" for n, w in counts.items()) + "}"
    shared = [f"tokens.counts={counts_yaml}", f"train.seed={seed}", f"data.seed={seed}", f"tokens.seed={seed}",
              "wandb.mode=disabled"]
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in (1, 2):
        overrides = [*shared, f"train.max_steps={steps[stage]}", f"train.save_every={steps[stage]}"]
        if stage == 1:
            overrides.append(f"model.projector_options={{pooling: {pooling}}}")
        run(f"{name}, seed {seed}: stage {stage}, {steps[stage]} steps",
            stage_command(stage, data_root, run_dir / f"stage{stage}", ranks, *overrides), env,
            log=run_dir / f"stage{stage}.log")
    return run_dir / "stage2" / "final", {s: samples_seen(run_dir / f"stage{s}") for s in (1, 2)}


def accuracy(result, kind):
    return result["accuracy"] if kind == "overall" else result["accuracy_by_type"].get(kind, math.nan)


def summarise(results, models, seeds):
    """{model: {kind: {N: (mean, spread, per-seed values)}}}; spread = half the range over seeds."""
    table = {}
    for model in models:
        for kind in TYPES:
            for n in EVAL_COUNTS:
                values = [accuracy(r, kind) for r in results
                          if r["study_model"] == model and r["num_vision_tokens"] == n and r["seed"] in seeds]
                if values:
                    table.setdefault(model, {}).setdefault(kind, {})[n] = (
                        statistics.mean(values), (max(values) - min(values)) / 2, values)
    return table


def own_count(name):
    counts = MODELS[name][0]
    return next(iter(counts)) if len(counts) == 1 else None


def points(x):
    return f"{100 * x:+.1f}"


def answers(table):
    """Markdown paragraphs answering the study's questions from the overall accuracy."""
    lines = []
    flex = table.get("flex", {}).get("overall")
    specialists = [m for m in table if own_count(m)]
    if flex and specialists:
        lines.append("**At the specialist's own N** (flex minus specialist, overall accuracy, points):\n")
        for name in specialists:
            n = own_count(name)
            diff = flex[n][0] - table[name]["overall"][n][0]
            verdict = "within 1 point" if diff >= -0.01 else "NOT within 1 point"
            lines.append(f"- {name} at N={n}: {points(diff)} ({verdict}; spreads ±{100 * flex[n][1]:.1f} / "
                         f"±{100 * table[name]['overall'][n][1]:.1f})")
        lines.append("\n**Away from it** (flex minus specialist at every other N; unseen counts marked *):\n")
        seen_by_flex = set(MODELS["flex"][0])
        for name in specialists:
            others = [n for n in EVAL_COUNTS if n != own_count(name) and n in flex]
            diffs = {n: flex[n][0] - table[name]["overall"][n][0] for n in others}
            wins = [n for n in others if diffs[n] > 0]
            cells = ", ".join(f"{n}{'*' if n not in seen_by_flex else ''}: {points(d)}" for n, d in diffs.items())
            lines.append(f"- {name}: flex ahead at {len(wins)} of {len(others)} counts ({cells})")
    if "flex" in table and "flex-resize" in table:
        diffs = {n: table["flex-resize"]["overall"][n][0] - table["flex"]["overall"][n][0] for n in EVAL_COUNTS
                 if n in table["flex"]["overall"]}
        cells = ", ".join(f"{n}: {points(d)}" for n, d in diffs.items())
        lines.append(f"\n**Pooling** (flex-resize minus flex, points; the two poolings are the same operation at N = "
                     f"16, 64 and 256 on the 16x16 grid): {cells}")
    return "\n".join(lines) + "\n"


def markdown_tables(table):
    parts = []
    for kind in TYPES:
        header = ["model", *(f"N={n}" for n in EVAL_COUNTS)]
        rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model, kinds in table.items():
            cells = [f"{100 * m:.1f} ± {100 * s:.1f}" if not math.isnan(m) else "-"
                     for m, s, _ in (kinds[kind][n] for n in EVAL_COUNTS if n in kinds[kind])]
            rows.append("| " + " | ".join([model, *cells]) + " |")
        parts.append(f"**{kind}** accuracy (%), mean ± spread over seeds\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


def plot(table, path):
    """Accuracy against N, one line per model (spread as error bars), a panel per question type."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    kinds = [k for k in TYPES if k != "text"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4), sharey=True)
    for ax, kind in zip(axes, kinds):
        for model, data in table.items():
            ns = [n for n in EVAL_COUNTS if n in data[kind]]
            ax.errorbar(ns, [data[kind][n][0] for n in ns], yerr=[data[kind][n][1] for n in ns], marker="o",
                        capsize=3, label=model, linestyle="--" if model == "flex-resize" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(EVAL_COUNTS, [str(n) for n in EVAL_COUNTS])
        ax.set_title(kind)
        ax.set_xlabel("vision tokens N at evaluation")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_commit():
    """The checkout's commit, and the files that differ from it (read when the study starts)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return git("rev-parse", "--short", "HEAD") + (f" (with uncommitted changes to {', '.join(changed)})" if changed else "")


def write_report(out, args, settings, table, results, wall_s):
    argv = " ".join(args.argv)
    header = [
        "# Flex vs fixed: does flexibility pay? (tiny CPU models)\n",
        (f"Command: `python -m bench.flex_vs_fixed{' ' + argv if argv else ''}`, at commit {settings['commit']}, "
         f"on {settings['machine']}, {settings['date']}; {wall_s / 60:.0f} min in all.\n"),
        (f"Models: {', '.join(f'{m} {MODELS[m][0]} ({MODELS[m][1]} pooling)' for m in settings['models'])}; seeds "
         f"{settings['seeds']}. Training: configs/tiny_cpu_stage1.yaml then tiny_cpu_stage2.yaml, 2 ranks, "
         f"{settings['train_samples']} synthetic training records; steps per model (stage 1 + stage 2) chosen so "
         f"that every model sees the same number of samples: "
         f"{', '.join(f'{m} {s[1]}+{s[2]}' for m, s in settings['steps'].items())}. Samples packed per step "
         f"(both ranks) at N: {', '.join(f'{n}: {v:.1f}' for n, v in settings['samples_per_step'].items())}. "
         f"Samples seen in stage 2 (mean over seeds): "
         f"{', '.join(f'{m} {v:.0f}' for m, v in settings['samples_seen_stage2'].items())}.\n"),
        (f"Evaluation: {settings['heldout_samples']} held-out records, exact match on the last answer, at N = "
         f"{', '.join(map(str, EVAL_COUNTS))}. With this many records one accuracy carries a sampling error of up "
         f"to ±{100 * math.sqrt(0.25 / settings['heldout_samples']):.1f} points overall (more per question type), "
         f"and the seeds' spread shows the training noise: differences of a point or two are below both.\n"),
    ]
    if settings["quick"]:
        header.append("A --quick run: a few steps per model, to check that the study runs; it measures nothing.\n")
    body = ["## Answers\n\n", answers(table), "\n## Accuracy by model and N\n", markdown_tables(table),
            f"\n![accuracy vs N]({RESULTS['.png'].name if args.write_results else 'accuracy_vs_tokens.png'})\n"]
    (out / "results.md").write_text("\n".join(header) + "\n" + "".join(body))
    summary = {model: {kind: {str(n): {"mean": m, "spread": s, "per_seed": v} for n, (m, s, v) in by_n.items()}
                       for kind, by_n in kinds.items()} for model, kinds in table.items()}
    (out / "results.json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": results}, indent=1))
    plot(table, out / "accuracy_vs_tokens.png")
    if args.write_results:
        for source, target in ((out / "results.md", RESULTS[".md"]), (out / "results.json", RESULTS[".json"]),
                               (out / "accuracy_vs_tokens.png", RESULTS[".png"])):
            shutil.copyfile(source, target)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/flex_vs_fixed"), help="work folder (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--train-samples", type=int, default=10000, help="synthetic training records")
    parser.add_argument("--heldout-samples", type=int, default=300, help="synthetic held-out records")
    parser.add_argument("--ranks", type=int, default=2, help="training processes per run (default: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="flex and fixed16, seed 0, 2+4 steps, 240 training and 24 held-out records: checks the "
                             "study runs end to end, measures nothing")
    parser.add_argument("--write-results", action="store_true", help="copy the results into bench/")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.quick:
        args.seeds, args.models, args.train_samples, args.heldout_samples = "0", "flex,fixed16", 240, 24
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.models = args.models.split(",")
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model {unknown[0]}; choose from {', '.join(MODELS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    started, load, commit = time.perf_counter(), os.getloadavg()[0], git_commit()
    out = args.out.resolve()
    env = cpu_training_env()
    out.mkdir(parents=True, exist_ok=True)
    make_models_and_data(out, args.train_samples, args.heldout_samples, env, log_dir=out)

    base = QUICK["steps"] if args.quick else {s: load_config(stage_config(s)).train.max_steps for s in (1, 2)}
    per_n = samples_per_step(out, sorted({n for m in args.models for n in MODELS[m][0]}), args.ranks,
                             QUICK["packer_batches"] if args.quick else PACKER_BATCHES)
    steps = {m: {s: scaled_steps(base[s], per_n, MODELS[m][0]) for s in (1, 2)} for m in args.models}
    print(f"samples per step at N: {per_n}; steps per model (stage 1, stage 2): {steps}", flush=True)

    folders, names, seen = [], [], {}
    for seed in args.seeds:
        for model in args.models:
            folder, samples = train(model, seed, out, out / "runs", steps[model], args.ranks, env)
            folders.append(folder)
            names.append(f"{model}-seed{seed}")
            seen.setdefault(model, []).append(samples[2])

    report = evaluate(folders, out / "shards" / "heldout", EVAL_COUNTS, names)
    results = []
    for r in report["results"]:
        model, seed = r["model"].rsplit("-seed", 1)
        results.append({k: v for k, v in r.items() if k != "predictions"} | {"study_model": model, "seed": int(seed)})
    table = summarise(results, args.models, args.seeds)
    settings = {"commit": commit, "date": datetime.date.today().isoformat(),
                "machine": (f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores, no GPU (load average "
                            f"{load:.1f} at the start)"),
                "models": args.models, "seeds": args.seeds, "train_samples": args.train_samples,
                "heldout_samples": args.heldout_samples, "steps": steps,
                "samples_per_step": {n: round(v, 2) for n, v in per_n.items()},
                "samples_seen_stage2": {m: statistics.mean(v) for m, v in seen.items()}, "quick": args.quick}
    write_report(out, args, settings, table, results, time.perf_counter() - started)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
