"""Frames against tokens per frame: one flex model trained on images and clips, evaluated on held-out
clips at every frame count and tokens per frame, on the tiny CPU models.

Data: synthetic records (tools.make_synthetic) of which --video-fraction are clips of a moving
shape changing colour (tools/synthetic_clips.py: which colour first or last, which way it moved,
how many times it changed), the rest scenes and text questions. Trains one model per seed with
the demo's recipe (configs/tiny_cpu_stage{1,2}.yaml, both stages, 2 ranks): images at N drawn
from {16, 64, 144}, VIDEO_FRAMES frames per clip at M drawn from TRAIN_FRAME_COUNTS (train, data
and tokens seed = the run's seed). Each model is then evaluated (pipeline.eval.heldout) on
held-out clips of make_synthetic's test split (clips no training record has) at EVAL_FRAMES
frames x EVAL_FRAME_COUNTS tokens per frame, and the results are summarised as mean and spread
(half the range) over seeds: accuracy against vision tokens per clip (frames x (M + a frame end)),
one curve per frame count, overall and per question type; and, at equal budgets, F frames at M
tokens against F/4 frames at 4M (nearly the same tokens per clip).

    python -m bench.video_study --write-results   # the study: 2 seeds (bench/video_results.md)
    python -m bench.video_study --quick           # minutes: 1 seed, a few steps (checks that it runs)

Writes OUT/results.md, OUT/results.json and OUT/accuracy_vs_frames.png; --write-results also copies
them to bench/video_results.{md,json} and bench/video_accuracy.png.
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

from pipeline.eval.heldout import evaluate
from tools.demo import REPO, cpu_training_env, run, torchrun
from tools.report import plot_accuracy_panels

TRAIN_COUNTS = "{16: 1, 64: 1, 144: 1}"
TRAIN_FRAME_COUNTS = "{1: 1, 4: 1, 16: 1, 64: 1}"
VIDEO_FRAMES = 8
EVAL_FRAMES = [1, 2, 4, 8, 16]
EVAL_FRAME_COUNTS = [1, 4, 16, 64]
KINDS = ["overall", "video_first", "video_last", "video_direction", "video_changes"]
RESULTS = {".md": REPO / "bench" / "video_results.md", ".json": REPO / "bench" / "video_results.json",
           ".png": REPO / "bench" / "video_accuracy.png"}
STEPS = {1: 20, 2: 1500}
QUICK_STEPS = {1: 2, 2: 4}


def make_data(out, train_samples, heldout_samples, video_fraction, env):
    """OUT/tiny (models), OUT/synthetic/{train,heldout} (scenes and clips; held-out: clips only),
    OUT/shards/{train,heldout}."""
    py = sys.executable
    run("tiny random-init models", [py, "-m", "tools.make_tiny_models", out / "tiny"], env, out / "tiny_models.log")
    for split, count, source, kinds in (("train", train_samples, "train", ["--video-fraction", video_fraction]),
                                        ("heldout", heldout_samples, "test",
                                         ["--video-fraction", "1", "--text-only-fraction", "0"])):
        run(f"synthetic {split} data", [py, "-m", "tools.make_synthetic", "--out", out / "synthetic" / split, "--n",
                                        count, "--split", source, *kinds], env, out / f"synthetic_{split}.log")
        run(f"{split} shards", [py, "-m", "tools.build_shards", "--input", out / "synthetic" / split / "data.json",
                                "--image-root", out / "synthetic" / split, "--out", out / "shards" / split,
                                "--samples-per-shard", max(1, min(500, count // 8))], env, out / f"shards_{split}.log")


def train(seed, out, steps, ranks, env):
    """Stage 1 then stage 2 of one model (a stage whose final folder OUT holds already is kept: a
    study interrupted after training goes on); returns its final model folder and the samples
    stage 2 saw."""
    run_dir = out / "runs" / f"flex-seed{seed}"
    shared = [f"data.shards={out / 'shards' / 'train'}", "data.seq_len=1024", f"tokens.counts={TRAIN_COUNTS}",
              f"tokens.frame_counts={TRAIN_FRAME_COUNTS}", f"data.video_frames={VIDEO_FRAMES}", f"train.seed={seed}",
              f"data.seed={seed}", f"tokens.seed={seed}", "wandb.mode=disabled"]
    starts = {1: [f"model.vision_path={out / 'tiny' / 'vision'}", f"model.lm_path={out / 'tiny' / 'qwen2'}"],
              2: [f"model.init_from={run_dir / 'stage1' / 'final'}"]}
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in (1, 2):
        if (run_dir / f"stage{stage}" / "final").is_dir():
            continue
        command = [*torchrun(ranks), "-m", "pipeline.train", f"configs/tiny_cpu_stage{stage}.yaml", *starts[stage],
                   f"train.output_dir={run_dir / f'stage{stage}'}", f"train.max_steps={steps[stage]}",
                   f"train.save_every={steps[stage]}", *shared]
        run(f"seed {seed}: stage {stage}, {steps[stage]} steps", command, env, log=run_dir / f"stage{stage}.log")
    rows = [json.loads(line) for line in (run_dir / "stage2" / "metrics.jsonl").read_text().splitlines()]
    return run_dir / "stage2" / "final", round(sum(r["samples_per_s"] * r["step_time_s"] for r in rows))


def accuracy(result, kind):
    return result["accuracy"] if kind == "overall" else result["accuracy_by_type"].get(kind, math.nan)


def summarise(results):
    """{frames: {kind: {M: (mean, spread, per-seed values, vision tokens per clip)}}}."""
    table = {}
    for r in results:
        by_kind = table.setdefault(r["num_frames"], {})
        for kind in KINDS:
            by_kind.setdefault(kind, {}).setdefault(r["num_frame_tokens"], []).append(
                (accuracy(r, kind), r["vision_tokens_per_clip"]))
    return {frames: {kind: {m: (statistics.mean(a for a, _ in v), (max(a for a, _ in v) - min(a for a, _ in v)) / 2,
                                [a for a, _ in v], statistics.mean(t for _, t in v))
                            for m, v in sorted(by_m.items())} for kind, by_m in kinds.items()}
            for frames, kinds in sorted(table.items())}


def markdown_tables(table):
    parts = []
    for kind in KINDS:
        rows = ["| frames | " + " | ".join(f"M={m}" for m in EVAL_FRAME_COUNTS) + " |",
                "|---|" + "---|" * len(EVAL_FRAME_COUNTS)]
        for frames, kinds in table.items():
            cells = [f"{100 * mean:.1f} ± {100 * spread:.1f} ({tokens:.0f})"
                     for mean, spread, _, tokens in (kinds[kind][m] for m in EVAL_FRAME_COUNTS)]
            rows.append(f"| {frames} | " + " | ".join(cells) + " |")
        heading = f"**{kind}** accuracy (%), mean ± spread over seeds (vision tokens per clip)"
        parts.append(heading + "\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


def budget_pairs(table):
    """F frames at M >= 4 tokens against F/4 frames at 4M: nearly the same vision tokens per clip
    (F (M + 1) against F (M + 1/4), with the frame ends)."""
    rows = ["| more frames | vision tokens | accuracy | fewer frames, more tokens | vision tokens | accuracy | "
            "difference (points) |", "|---|---|---|---|---|---|---|"]
    for frames in EVAL_FRAMES:
        for m in EVAL_FRAME_COUNTS:
            if frames // 4 in table and frames % 4 == 0 and m >= 4 and 4 * m in EVAL_FRAME_COUNTS:
                many, few = table[frames]["overall"][m], table[frames // 4]["overall"][4 * m]
                rows.append(f"| {frames} x M={m} | {many[3]:.0f} | {100 * many[0]:.1f} ± {100 * many[1]:.1f} | "
                            f"{frames // 4} x M={4 * m} | {few[3]:.0f} | {100 * few[0]:.1f} ± {100 * few[1]:.1f} | "
                            f"{100 * (many[0] - few[0]):+.1f} |")
    return "\n".join(rows) + "\n"


def plot(table, path):
    """Accuracy against vision tokens per clip, one line per frame count, a panel per question kind."""
    panels = {kind: [(f"{frames} frame(s)", [t for *_, t in points], [m for m, *_ in points],
                      [s for _, s, *_ in points], False)
                     for frames, kinds in table.items() for points in [[kinds[kind][m] for m in EVAL_FRAME_COUNTS]]]
              for kind in KINDS}
    plot_accuracy_panels(panels, path, "vision tokens per clip")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/video_study"), help="work folder (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--train-samples", type=int, default=6000, help="synthetic training records")
    parser.add_argument("--video-fraction", type=float, default=0.6, help="of the training records, clips")
    parser.add_argument("--heldout-samples", type=int, default=200,
                        help="held-out clips (default: %(default)s; about 50 per question type)")
    parser.add_argument("--ranks", type=int, default=2, help="training processes per run (default: 2)")
    parser.add_argument("--stage2-steps", type=int, default=STEPS[2],
                        help="stage-2 steps per model (default: %(default)s; fewer to fit a time limit)")
    parser.add_argument("--quick", action="store_true",
                        help="seed 0, 2+4 steps, 240 training and 24 held-out records: checks that the study runs, "
                             "measures nothing")
    parser.add_argument("--write-results", action="store_true", help="copy the results into bench/")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.train_samples, args.heldout_samples = "0", 240, 24
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.stage2_steps < 1:
        parser.error("--stage2-steps must be >= 1")
    steps = QUICK_STEPS if args.quick else {1: STEPS[1], 2: args.stage2_steps}
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = cpu_training_env()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()  # the code the study runs, read before it starts
    started = time.perf_counter()
    make_data(out, args.train_samples, args.heldout_samples, args.video_fraction, env)
    results, samples = [], {}
    for seed in seeds:
        folder, samples[f"seed{seed}"] = train(seed, out, steps, args.ranks, env)
        report = evaluate([folder], out / "shards" / "heldout", [16], ["flex"], batch_size=16, frames=EVAL_FRAMES,
                          frame_counts=EVAL_FRAME_COUNTS)
        results += [dict(r, seed=seed, predictions=None) for r in report["results"]]
    table = summarise(results)
    wall = time.perf_counter() - started
    command = "python -m bench.video_study" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    header = (f"# Frames against tokens per frame (tiny CPU models)\n\nCommand: `{command}`, at commit {commit}, on "
              f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
              f"trained and evaluated on CPU; load average {os.getloadavg()[0]:.1f} at the end), "
              f"{datetime.date.today()}; {wall / 60:.0f} min in all. Seeds {seeds}; steps (stage 1 + stage 2) "
              f"{steps[1]}+{steps[2]}, {args.train_samples} training records ({args.video_fraction:.0%} clips), "
              f"{VIDEO_FRAMES} frames per clip at M drawn from {TRAIN_FRAME_COUNTS}; stage-2 samples seen: "
              f"{', '.join(f'{k} {v}' for k, v in samples.items())}. {args.heldout_samples} held-out clips; one "
              f"accuracy carries a sampling error of up to ±{100 * math.sqrt(0.25 / args.heldout_samples):.1f} points "
              f"overall, about twice that per question type (chance: 25% each).\n")
    if args.quick:
        header += "\nA --quick run: a few steps, to check that the study runs; it measures nothing.\n"
    elif steps[2] < STEPS[2]:
        header += (f"\nStage 2 was cut from the study's {STEPS[2]} steps to {steps[2]} (--stage2-steps) to fit the "
                   f"time given: the models are less trained than the study intends.\n")
    png = RESULTS[".png"].name if args.write_results else "accuracy_vs_frames.png"
    (out / "results.md").write_text(header + "\n" + markdown_tables(table) + "\n**The same budget** (overall "
                                    "accuracy, %)\n\n" + budget_pairs(table) + f"\n![accuracy vs frames]({png})\n")
    summary = {str(frames): {kind: {str(m): {"mean": mean, "spread": s, "per_seed": v, "vision_tokens": t}
                                    for m, (mean, s, v, t) in by_m.items()} for kind, by_m in kinds.items()}
               for frames, kinds in table.items()}
    (out / "results.json").write_text(json.dumps({"seeds": seeds, "steps": steps, "samples": samples,
                                                  "summary": summary, "runs": results}, indent=1))
    plot(table, out / "accuracy_vs_frames.png")
    if args.write_results:
        for suffix, target in RESULTS.items():
            made = {".md": "results.md", ".json": "results.json", ".png": "accuracy_vs_frames.png"}[suffix]
            shutil.copyfile(out / made, target)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
