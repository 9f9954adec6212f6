"""Do tiles pay where resolution matters? Models trained with 1 and with 4 tiles per image, on the tiny CPU models.

Data: synthetic scenes (tools.make_synthetic) of which half are 4x as wide as high or as high as
wide (--wide-fraction 0.5: one 64 px tile shrinks each of their 8 px dots to 2 px, a 1 x 4 grid
sees them whole) and a fifth are two-scene records (--multi-image-fraction 0.2). Trains, with the demo's
recipe (configs/tiny_cpu_stage{1,2}.yaml, both stages, 2 ranks, N drawn from {16, 64, 144}):
  tiles1  data.max_tiles 1 (one tile per image)
  tiles4  data.max_tiles 4, data.multi_image_max_tiles 2
with the same seeds (train, data and tokens seed = the run's seed) and the same step counts
(a tiles4 step packs fewer samples: each image brings more slots; the report gives the samples
each saw). Every model is then evaluated (pipeline.eval.heldout) on held-out records of the same kind,
drawn from make_synthetic's test split (scenes and text questions no training record has),
with 1 and with 4 tiles at N = 16, 36, 64, 100 and 144, and the results are summarised as mean and
spread (half the range) over seeds: accuracy against vision tokens per image, one curve per
model and tile limit, overall and on the wide and tall scenes' fine question.

    python -m bench.tiles_study --write-results   # the study: 2 seeds (bench/tiles_results.md)
    python -m bench.tiles_study --quick           # minutes: 1 seed, a few steps (tests)

Writes OUT/results.md, OUT/results.json and OUT/accuracy_vs_tiles.png; --write-results also copies
them to bench/tiles_results.{md,json} and bench/tiles_accuracy.png.
"""

import argparse
import datetime
import json
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from pipeline.eval.heldout import evaluate
from tools.demo import REPO, cpu_training_env, run, torchrun
from tools.report import plot_accuracy_panels

MODELS = {"tiles1": ["data.max_tiles=1"], "tiles4": ["data.max_tiles=4", "data.multi_image_max_tiles=2"]}
TRAIN_COUNTS = "{16: 1, 64: 1, 144: 1}"
EVAL_COUNTS = [16, 36, 64, 100, 144]
EVAL_TILES = [1, 4]
KINDS = ["overall", "wide_fine", "tall_fine", "fine", "multi_fine"]
RESULTS = {".md": REPO / "bench" / "tiles_results.md", ".json": REPO / "bench" / "tiles_results.json",
           ".png": REPO / "bench" / "tiles_accuracy.png"}
STEPS = {1: 20, 2: 900}
QUICK_STEPS = {1: 2, 2: 4}


def make_data(out, train_samples, heldout_samples, env):
    """OUT/tiny (models), OUT/synthetic/{train,heldout} (wide, tall and two-scene records),
    OUT/shards/{train,heldout}."""
    py = sys.executable
    run("tiny random-init models", [py, "-m", "tools.make_tiny_models", out / "tiny"], env, out / "tiny_models.log")
    # held-out records are the test split's: scenes and text questions no training record has
    for split, count, source in (("train", train_samples, "train"), ("heldout", heldout_samples, "test")):
        run(f"synthetic {split} data",
            [py, "-m", "tools.make_synthetic", "--out", out / "synthetic" / split, "--n", count, "--split", source,
             "--wide-fraction", "0.5", "--multi-image-fraction", "0.2"],
            env, out / f"synthetic_{split}.log")
        run(f"{split} shards", [py, "-m", "tools.build_shards", "--input", out / "synthetic" / split / "data.json",
                                "--image-root", out / "synthetic" / split, "--out", out / "shards" / split,
                                "--samples-per-shard", max(1, min(500, count // 8))], env, out / f"shards_{split}.log")


def train(name, seed, out, steps, ranks, env):
    """Stage 1 then stage 2 of one model; returns its final model folder and the samples stage 2 saw."""
    run_dir = out / "runs" / f"{name}-seed{seed}"
    shared = [f"data.shards={out / 'shards' / 'train'}", "data.seq_len=1024", f"tokens.counts={TRAIN_COUNTS}",
              f"train.seed={seed}", f"data.seed={seed}", f"tokens.seed={seed}", "wandb.mode=disabled", *MODELS[name]]
    starts = {1: [f"model.vision_path={out / 'tiny' / 'vision'}", f"model.lm_path={out / 'tiny' / 'qwen2'}"],
              2: [f"model.init_from={run_dir / 'stage1' / 'final'}"]}
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in (1, 2):
        command = [*torchrun(ranks), "-m", "pipeline.train", f"configs/tiny_cpu_stage{stage}.yaml", *starts[stage],
                   f"train.output_dir={run_dir / f'stage{stage}'}", f"train.max_steps={steps[stage]}",
                   f"train.save_every={steps[stage]}", *shared]
        run(f"{name}, seed {seed}: stage {stage}, {steps[stage]} steps", command, env,
            log=run_dir / f"stage{stage}.log")
    rows = [json.loads(line) for line in (run_dir / "stage2" / "metrics.jsonl").read_text().splitlines()]
    return run_dir / "stage2" / "final", round(sum(r["samples_per_s"] * r["step_time_s"] for r in rows))


def accuracy(result, kind):
    return result["accuracy"] if kind == "overall" else result["accuracy_by_type"].get(kind, math.nan)


def summarise(results, seeds):
    """{(model, eval tiles): {kind: {N: (mean, spread, values, vision tokens per image)}}}."""
    table = {}
    for r in results:
        if r["seed"] not in seeds:
            continue
        cell = table.setdefault((r["study_model"], r["num_tiles"]), {})
        for kind in KINDS:
            cell.setdefault(kind, {}).setdefault(r["num_vision_tokens"], []).append((accuracy(r, kind),
                                                                                     r["vision_tokens_per_image"]))
    return {key: {kind: {n: (statistics.mean(a for a, _ in v), (max(a for a, _ in v) - min(a for a, _ in v)) / 2,
                             [a for a, _ in v], statistics.mean(t for _, t in v))
                         for n, v in sorted(by_n.items())} for kind, by_n in kinds.items()}
            for key, kinds in table.items()}


def markdown_tables(table):
    parts = []
    for kind in KINDS:
        rows = ["| model | eval tiles | " + " | ".join(f"N={n}" for n in EVAL_COUNTS) + " |",
                "|---|---|" + "---|" * len(EVAL_COUNTS)]
        for (model, tiles), kinds in table.items():
            cells = ["-" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f} ({t:.0f})"
                     for m, s, _, t in (kinds[kind][n] for n in EVAL_COUNTS)]
            rows.append(f"| {model} | {tiles} | " + " | ".join(cells) + " |")
        heading = f"**{kind}** accuracy (%), mean ± spread over seeds (vision tokens per image)"
        parts.append(heading + "\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


def plot(table, path):
    """Accuracy against vision tokens per image, one line per model and eval tile limit, a panel per kind."""
    panels = {kind: [(f"{model}, {tiles} tile(s)", [t for *_, t in points], [m for m, *_ in points],
                      [s for _, s, *_ in points], tiles == 1)
                     for (model, tiles), kinds in table.items() for points in [[kinds[kind][n] for n in EVAL_COUNTS]]]
              for kind in KINDS}
    plot_accuracy_panels(panels, path, "vision tokens per image")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/tiles_study"), help="work folder (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--train-samples", type=int, default=10000, help="synthetic training records")
    parser.add_argument("--heldout-samples", type=int, default=600,
                        help="synthetic held-out records (default: %(default)s; about 35 per wide or tall fine "
                             "question)")
    parser.add_argument("--ranks", type=int, default=2, help="training processes per run (default: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="seed 0, 2+4 steps, 240 training and 24 held-out records: checks that the study runs, "
                             "measures nothing")
    parser.add_argument("--write-results", action="store_true", help="copy the results into bench/")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.train_samples, args.heldout_samples = "0", 240, 24
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = QUICK_STEPS if args.quick else STEPS
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = cpu_training_env()
    started = time.perf_counter()
    make_data(out, args.train_samples, args.heldout_samples, env)
    results, samples = [], {}
    for name in MODELS:
        for seed in seeds:
            folder, samples[f"{name}-seed{seed}"] = train(name, seed, out, steps, args.ranks, env)
            report = evaluate([folder], out / "shards" / "heldout", EVAL_COUNTS, [name], tiles=EVAL_TILES)
            results += [dict(r, study_model=name, seed=seed, predictions=None) for r in report["results"]]
    table = summarise(results, seeds)
    wall = time.perf_counter() - started
    command = "python -m bench.tiles_study" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    header = (f"# Tiles where resolution matters (tiny CPU models)\n\nCommand: `{command}`, on {platform.node()} "
              f"({platform.processor() or platform.machine()}), {datetime.date.today()}; {wall / 60:.0f} min in all. "
              f"Seeds {seeds}; steps per model (stage 1 + stage 2) {steps[1]}+{steps[2]}; stage-2 samples seen: "
              f"{', '.join(f'{k} {v}' for k, v in samples.items())}. {args.heldout_samples} held-out records; one "
              f"accuracy carries a sampling error of up to ±{100 * math.sqrt(0.25 / args.heldout_samples):.1f} points "
              f"overall, more per question type.\n")
    if args.quick:
        header += "\nA --quick run: a few steps per model, to check that the study runs; it measures nothing.\n"
    (out / "results.md").write_text(header + "\n" + markdown_tables(table) + "\n![accuracy vs tiles]("
                                    + (RESULTS[".png"].name if args.write_results else "accuracy_vs_tiles.png") + ")\n")
    summary = {f"{model} tiles={tiles}": {kind: {str(n): {"mean": m, "spread": s, "per_seed": v, "vision_tokens": t}
                                                 for n, (m, s, v, t) in by_n.items()} for kind, by_n in kinds.items()}
               for (model, tiles), kinds in table.items()}
    (out / "results.json").write_text(json.dumps({"seeds": seeds, "steps": steps, "samples": samples,
                                                  "summary": summary, "runs": results}, indent=1))
    plot(table, out / "accuracy_vs_tiles.png")
    if args.write_results:
        for suffix, target in RESULTS.items():
            made = {".md": "results.md", ".json": "results.json", ".png": "accuracy_vs_tiles.png"}[suffix]
            shutil.copyfile(out / made, target)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
