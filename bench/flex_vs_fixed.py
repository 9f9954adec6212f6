"""Does flexibility pay, and what makes it pay? TokenFLEX models against fixed-N specialists, on the
tiny CPU models, each trained as the demo trains (tools.demo.RUNS: stage 1, then stage 2 in two
parts, the fine question first; 2 ranks).

Studies (--studies, comma-separated; each reuses the models an earlier one trained in --out):
  main      flex {16: 1, 64: 1, 144: 1} against fixed16, fixed64 and fixed144 (3 seeds)
  weights   flex-235: the flex set weighted towards the larger counts, 2:3:5 (2 seeds)
  loss      flex-square: InternVL's "square" loss reduction (train.loss_reduction=square) (2 seeds)
  compute   fixed16/64/144-compute: specialists given the flex model's training FLOPs
            (pipeline.train.metrics' useful count) instead of its samples (2 seeds)
  smallest  flex-64-144 {64: 1, 144: 1} against fixed64 and fixed144: does the smallest count
            cost the larger ones? (2 seeds)
  pooling   flex-resize: the projector's resize_avg pooling instead of adaptive average pooling (2 seeds)
Every model sees the same data with the same seeds (train, data and tokens seed = the run's seed).
Sample-matched models run as many steps as the flex model's samples take at their counts, compute-
matched ones as many as its useful FLOPs take; both measured with the project's packer on each
run's training shards before training (every run alike). The flex model runs the configs' steps.
The data are tools.make_synthetic's splits (disjoint scenes and text questions); every model is
evaluated on the test split only (nothing is tuned on it): in the main study at N = 16, 36, 64,
100, 144, 196 and 256 (36, 100, 196 and 256 are seen by none), in the ablations at 16, 64, 144 and
256. Figures are mean ± standard deviation over seeds.

    python -m bench.flex_vs_fixed --studies main --write-results          # the main table
    python -m bench.flex_vs_fixed --studies main,weights,loss,compute,smallest --write-results
    python -m bench.flex_vs_fixed --quick                                 # minutes: checks it runs (tests)

Time, estimated from the demo's run of the same recipe (2026-12-06, 2 free cores: stage 1 16 s,
stage 2's parts 375 s and 175 s, 200 records at 7 N in 18 s): about 10 minutes a model and seed,
so about 2 hours for main (12 trainings, 84,000 answers) and as long again for every further 12
models and seeds of the ablations. The results files say what a run took.

Writes OUT/<study>/results.{md,json} and accuracy_vs_tokens.png per study; --write-results copies
them to bench/flex_vs_fixed_results.{md,json} and bench/flex_vs_fixed_accuracy.png (main) and
bench/flex_vs_fixed_<study>_results.{md,json} and _accuracy.png (ablations). Trained models and
their evaluations are kept under OUT/runs and reused when the same settings ask for them again.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data import TrainBatches
from pipeline.eval.heldout import evaluate
from pipeline.model.vlm import TokenFlexVLM
from pipeline.run.config import load_config
from pipeline.train.flops import Work, step_flops
from stages import STAGES
from tools.demo import DATA_SIZES, REPO, RUNS, cpu_training_env, make_models_and_data, run, stage_command
from tools.report import plot_accuracy_panels

FLEX = {16: 1, 64: 1, 144: 1}
EVAL_COUNTS = [16, 36, 64, 100, 144, 196, 256]  # the main study's; 36, 100, 196 and 256 are seen by no model
ABLATION_COUNTS = [16, 64, 144, 256]  # the ablations': evaluation is most of a study's time
EVAL_BATCH_SIZE = 32


@dataclass(frozen=True)
class Model:
    counts: dict
    pooling: str = "adaptive"
    loss_reduction: str = "token"
    matched: str = "samples"  # to the flex model's samples, or its useful training FLOPs ("compute")

    def describe(self):
        extras = [x for x in (f"{self.pooling} pooling" if self.pooling != "adaptive" else "",
                              f"{self.loss_reduction} loss" if self.loss_reduction != "token" else "",
                              "compute-matched" if self.matched == "compute" else "") if x]
        return f"{self.counts}" + (f" ({', '.join(extras)})" if extras else "")


MODELS = {
    "flex": Model(FLEX),
    "fixed16": Model({16: 1}), "fixed64": Model({64: 1}), "fixed144": Model({144: 1}),
    "flex-235": Model({16: 2, 64: 3, 144: 5}),
    "flex-square": Model(FLEX, loss_reduction="square"),
    "fixed16-compute": Model({16: 1}, matched="compute"), "fixed64-compute": Model({64: 1}, matched="compute"),
    "fixed144-compute": Model({144: 1}, matched="compute"),
    "flex-64-144": Model({64: 1, 144: 1}),
    "flex-resize": Model(FLEX, pooling="resize_avg"),
}


@dataclass(frozen=True)
class Study:
    question: str
    models: list
    seeds: list
    flex: str = "flex"  # the model the specialists (or the variant) are compared with
    specialists: list = field(default_factory=list)
    counts: list = field(default_factory=lambda: ABLATION_COUNTS)  # N at evaluation


STUDIES = {
    "main": Study("Does one flex model match each specialist at its N, and beat it away from it?",
                  ["flex", "fixed16", "fixed64", "fixed144"], [0, 1, 2],
                  specialists=["fixed16", "fixed64", "fixed144"], counts=EVAL_COUNTS),
    "weights": Study("Token-count weights 1:1:1 against 2:3:5 (towards the larger counts)",
                     ["flex", "flex-235"], [0, 1]),
    "loss": Study("Loss reduction: per token over the step against InternVL's square (1/sqrt of a sample's tokens)",
                  ["flex", "flex-square"], [0, 1]),
    "compute": Study("Compute-matched: specialists given the flex model's useful training FLOPs, not its samples",
                     ["flex", "fixed16-compute", "fixed64-compute", "fixed144-compute"], [0, 1],
                     specialists=["fixed16-compute", "fixed64-compute", "fixed144-compute"]),
    "smallest": Study("Does the smallest count cost the larger ones? flex {64, 144} against fixed64 and fixed144",
                      ["flex-64-144", "flex", "fixed64", "fixed144"], [0, 1], flex="flex-64-144",
                      specialists=["fixed64", "fixed144"]),
    "pooling": Study("Pooling: resize_avg (the authors' code) against adaptive average pooling",
                     ["flex", "flex-resize"], [0, 1]),
}
TYPES = ["overall", "coarse", "medium", "fine", "text"]
PACKER_BATCHES = 30  # batches per rank and N for measuring samples and FLOPs per step
QUICK = {"steps": {"stage1": 2, "stage2_fine": 4, "stage2": 4}, "packer_batches": 4, "seeds": [0],
         "models": 2,  # each study's first two
         "splits": {"train": 240, "train_fine": 240, "validation": 24, "test": 48}}


def run_config(name, overrides=()):
    return load_config(REPO / RUNS[name][0], list(overrides))


def results_paths(study):
    stem = "flex_vs_fixed" if study == "main" else f"flex_vs_fixed_{study}"
    return {".md": REPO / "bench" / f"{stem}_results.md", ".json": REPO / "bench" / f"{stem}_results.json",
            ".png": REPO / "bench" / f"{stem}_accuracy.png"}


# ---- steps: matching the flex model's samples or its compute ----

def per_step_costs(data_root, counts, ranks, batches=PACKER_BATCHES):
    """{run: {N: {"samples": mean samples one optimizer step packs (all ranks), "flops": its
    useful training FLOPs (pipeline.train.flops.step_flops, with the run's trained parts)}}} for
    each run of RUNS, from its packer (pipeline.data.batches.TrainBatches) on its training shards;
    nothing trains."""
    model = TokenFlexVLM.from_components(data_root / "tiny" / "vision", data_root / "tiny" / "qwen2")
    costs = {}
    for name, (_, data) in RUNS.items():
        cfg = run_config(name, [f"data.shards={data_root / 'shards' / data}"])
        STAGES[cfg.train.stage].freeze_backbones(model, cfg)
        costs[name] = {}
        for n in counts:
            samples = flops = 0.0
            for rank in range(ranks):
                stream = TrainBatches(cfg.data, model.tokenizer, model.image_processor, rank, ranks)
                for _ in range(batches):
                    batch = stream.next_batch(n)
                    samples += batch.pop("stats")["num_samples"]
                    flops += step_flops(model, n, Work.of(batch, model.tokenizer.pad_token_id))[0]
            costs[name][n] = {"samples": samples / batches, "flops": flops / batches}
    return costs


def mean_cost(per_n, counts, kind):
    """A step's mean cost under the token-count weights (N is drawn per step)."""
    return sum(per_n[n][kind] * w for n, w in counts.items()) / sum(counts.values())


def scaled_steps(base_steps, per_n, model):
    """Steps that see as many samples (or spend as many useful FLOPs) at the model's counts as
    base_steps do at the flex mix."""
    kind = "flops" if model.matched == "compute" else "samples"
    return max(1, round(base_steps * mean_cost(per_n, FLEX, kind) / mean_cost(per_n, model.counts, kind)))


# ---- training and evaluation of one model and seed, reused when asked again ----

def train(name, seed, data_root, run_dir, steps, ranks, env):
    """The runs of RUNS in order, for one model; returns its final model folder."""
    model = MODELS[name]
    counts_yaml = "{" + ", ".join(f"{n}: {w}" for n, w in model.counts.items()) + "}"
    shared = [f"tokens.counts={counts_yaml}", f"train.seed={seed}", f"data.seed={seed}", f"tokens.seed={seed}",
              f"train.loss_reduction={model.loss_reduction}", "wandb.mode=disabled"]
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for part in RUNS:
        overrides = [*shared, f"train.max_steps={steps[part]}", f"train.save_every={steps[part]}"]
        if part == "stage1":
            overrides.append(f"model.projector_options={{pooling: {model.pooling}}}")
        run(f"{name}, seed {seed}: {part}, {steps[part]} steps",
            stage_command(part, data_root, run_dir / part, ranks, *overrides), env, log=run_dir / f"{part}.log")
    return run_dir / "stage2" / "final"


def run_totals(output_dir):
    """Training samples and useful FLOPs over all ranks, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"samples": round(sum(r["samples_per_s"] * r["step_time_s"] for r in rows)),
            "useful_flops": sum(r["useful_flops"] for r in rows)}


def trained_and_evaluated(name, seed, out, steps, counts, ranks, env):
    """The model's results at `counts` on the test split. OUT/runs/<name>-seed<seed>/results.json
    keeps a model's results: with the same steps it is not trained again, and only counts it
    lacks are evaluated."""
    run_dir = out / "runs" / f"{name}-seed{seed}"
    saved = run_dir / "results.json"
    steps_key = {str(s): v for s, v in steps.items()}
    record = json.loads(saved.read_text()) if saved.exists() else {}
    if record.get("steps") == steps_key:
        print(f"{name}, seed {seed}: reusing {run_dir}", flush=True)
    else:
        train(name, seed, out, run_dir, steps, ranks, env)
        record = {"steps": steps_key, "trained": {part: run_totals(run_dir / part) for part in RUNS},
                  "results": []}
    missing = [n for n in counts if n not in {r["num_vision_tokens"] for r in record["results"]}]
    if missing:
        report = evaluate([run_dir / "stage2" / "final"], out / "shards" / "test", missing, [f"{name}-seed{seed}"],
                          batch_size=EVAL_BATCH_SIZE)
        record["results"] += [{k: v for k, v in r.items() if k != "predictions"} | {"study_model": name, "seed": seed}
                              for r in report["results"]]
        saved.write_text(json.dumps(record, indent=1))
    return record | {"results": [r for r in record["results"] if r["num_vision_tokens"] in counts]}


# ---- summaries and verdicts ----

def accuracy(result, kind):
    return result["accuracy"] if kind == "overall" else result["accuracy_by_type"].get(kind, math.nan)


def summarise(results, models, seeds):
    """{model: {kind: {N: (mean, standard deviation, per-seed values)}}} over seeds (sd 0 for one seed)."""
    table = {}
    for model in models:
        for kind in TYPES:
            for n in EVAL_COUNTS:
                values = [accuracy(r, kind) for r in results
                          if r["study_model"] == model and r["num_vision_tokens"] == n and r["seed"] in seeds]
                if values:
                    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                    table.setdefault(model, {}).setdefault(kind, {})[n] = (statistics.mean(values), sd, values)
    return table


def own_count(name):
    counts = MODELS[name].counts
    return next(iter(counts)) if len(counts) == 1 else None


def points(x):
    return f"{100 * x:+.1f}"


def within(diff):
    """Within 1 point either way: +4 is not "within"."""
    return "within 1 point" if abs(diff) <= 0.01 else "NOT within 1 point"


def verdicts(diff):
    """Two verdicts on a difference (flex minus specialist): within 1 point either way, and not
    worse by more than 1 point (which also holds whenever flex is ahead)."""
    return f"{within(diff)}; {'not worse by more than 1 point' if diff >= -0.01 else 'worse by more than 1 point'}"


def answers(table, study):
    """Markdown paragraphs answering the study's question from the overall accuracy."""
    lines = []
    flex = table.get(study.flex, {}).get("overall")
    specialists = [m for m in study.specialists if m in table]
    if flex and specialists:
        lines.append(f"**At the specialist's own N** ({study.flex} minus specialist, overall accuracy, points; "
                     f"± the standard deviations over seeds):\n")
        for name in specialists:
            n = own_count(name)
            diff = flex[n][0] - table[name]["overall"][n][0]
            lines.append(f"- {name} at N={n}: {points(diff)} ({verdicts(diff)}; ±{100 * flex[n][1]:.1f} / "
                         f"±{100 * table[name]['overall'][n][1]:.1f})")
        lines.append(f"\n**Away from it** ({study.flex} minus specialist at every other N; counts {study.flex} "
                     f"never trained on marked *):\n")
        seen_by_flex = set(MODELS[study.flex].counts)
        for name in specialists:
            others = [n for n in EVAL_COUNTS if n != own_count(name) and n in flex]
            diffs = {n: flex[n][0] - table[name]["overall"][n][0] for n in others}
            wins = [n for n in others if diffs[n] > 0]
            cells = ", ".join(f"{n}{'*' if n not in seen_by_flex else ''}: {points(d)}" for n, d in diffs.items())
            lines.append(f"- {name}: {study.flex} ahead at {len(wins)} of {len(others)} counts ({cells})")
    for variant in (m for m in study.models if m not in specialists and m != study.flex and m in table):
        diffs = {n: table[variant]["overall"][n][0] - flex[n][0] for n in EVAL_COUNTS if n in flex}
        cells = ", ".join(f"{n}: {points(d)} ({within(d)})" for n, d in diffs.items())
        lines.append(f"\n**{variant} minus {study.flex}** (overall accuracy, points): {cells}")
    return "\n".join(lines) + "\n"


def markdown_tables(table):
    parts = []
    for kind in TYPES:
        header = ["model", *(f"N={n}" for n in EVAL_COUNTS)]
        rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model, kinds in table.items():
            cells = ["-" if n not in kinds[kind] or math.isnan(kinds[kind][n][0]) else
                     f"{100 * kinds[kind][n][0]:.1f} ± {100 * kinds[kind][n][1]:.1f}" for n in EVAL_COUNTS]
            rows.append("| " + " | ".join([model, *cells]) + " |")
        parts.append(f"**{kind}** accuracy (%), mean ± standard deviation over seeds\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


def plot(table, path):
    """Accuracy against N, one line per model (standard deviation as error bars), a panel per question type."""
    panels = {kind: [(model, ns, [data[kind][n][0] for n in ns], [data[kind][n][1] for n in ns],
                      len(MODELS[model].counts) > 1)
                     for model, data in table.items() for ns in [[n for n in EVAL_COUNTS if n in data[kind]]]]
              for kind in TYPES if kind != "text"}
    plot_accuracy_panels(panels, path, "vision tokens N at evaluation", EVAL_COUNTS)


# ---- the report ----

def git_commit():
    """The checkout's commit, and the files that differ from it (read when the study starts)."""
    def git(*args):
        # rstrip: porcelain lines start with a space that a strip would take from the first
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.rstrip()

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return git("rev-parse", "--short", "HEAD") + (
        f" (with uncommitted changes to {', '.join(changed)})" if changed else ""
    )


def write_report(out, args, name, study, settings, records, wall_s):
    results = [r for record in records for r in record["results"]]
    table = summarise(results, study.models, study.seeds)
    costs, test = settings["per_step"], settings["splits"]["test"]
    argv = " ".join(args.argv)
    per_step = "; ".join(f"{part}: " + ", ".join(f"{n}: {v['samples']:.1f} samples, {v['flops'] / 1e9:.1f} GFLOP"
                                                 for n, v in costs[part].items()) for part in RUNS if part != "stage1")
    base = settings["base_steps"]
    trained = trained_means(records)
    header = [
        f"# Flex vs fixed, study `{name}`: {study.question} (tiny CPU models)\n",
        (
            f"Command: `python -m bench.flex_vs_fixed{' ' + argv if argv else ''}`, at commit {settings['commit']}, "
            f"on {settings['machine']}, {settings['date']}; {wall_s / 60:.0f} min for the whole command (models "
            f"trained by an earlier command in the same folder are reused, not retrained).\n"
        ),
        (
            f"Models: {', '.join(f'{m} {MODELS[m].describe()}' for m in study.models)}; seeds {study.seeds}. "
            f"Training: the demo's runs, {' then '.join(f'{part} ({RUNS[part][0]})' for part in RUNS)}, 2 ranks, "
            f"{settings['splits']['train']} synthetic training records and {settings['splits']['train_fine']} "
            f"fine-only ones, the flex model's steps {' + '.join(str(base[part]) for part in RUNS)} (the configs'); "
            f"the others' steps match its samples or, compute-matched, its useful training FLOPs: "
            f"{', '.join(f'{m} ' + '+'.join(map(str, settings['steps'][m].values())) for m in study.models)}. "
            f"Per step (both ranks) at N: {per_step}. "
            f"Stage 2 as trained, both parts (mean over seeds): "
            f"{', '.join(f'{m} {v[0]:.0f} samples, {v[1] / 1e12:.1f} TFLOP' for m, v in trained.items())}.\n"
        ),
        (
            f"Evaluation: the test split's {test} records (tools.make_synthetic --split test: no scene and no text "
            f"question of it is in the training or validation split), exact match on the last answer, at N = "
            f"{', '.join(map(str, study.counts))}; nothing was tuned on it. One accuracy carries a sampling error "
            f"of up to ±{100 * math.sqrt(0.25 / test):.1f} points overall (about twice that per question type), "
            f"and the standard deviation over seeds shows the training noise.\n"
        ),
    ]
    if settings["quick"]:
        header.append("A --quick run: a few steps per model, to check that the study runs; it measures nothing.\n")
    png = results_paths(name)[".png"].name if args.write_results else "accuracy_vs_tokens.png"
    body = ["## Answers\n\n", answers(table, study), "\n## Accuracy by model and N\n", markdown_tables(table),
            f"\n![accuracy vs N]({png})\n"]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.md").write_text("\n".join(header) + "\n" + "".join(body))
    summary = {model: {kind: {str(n): {"mean": m, "sd": s, "per_seed": v} for n, (m, s, v) in by_n.items()}
                       for kind, by_n in kinds.items()} for model, kinds in table.items()}
    (folder / "results.json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": results},
                                                    indent=1))
    plot(table, folder / "accuracy_vs_tokens.png")
    if args.write_results:
        for suffix, target in results_paths(name).items():
            source = folder / ("accuracy_vs_tokens.png" if suffix == ".png" else f"results{suffix}")
            shutil.copyfile(source, target)
    return folder / "results.md"


def trained_means(records):
    """{model: (stage-2 samples, stage-2 useful FLOPs)}, both parts, mean over the records' seeds."""
    by_model = {}
    for record in records:
        parts = [record["trained"][part] for part in RUNS if part != "stage1"]
        by_model.setdefault(record["results"][0]["study_model"], []).append(
            (sum(t["samples"] for t in parts), sum(t["useful_flops"] for t in parts)))
    return {m: (statistics.mean(t[0] for t in v), statistics.mean(t[1] for t in v)) for m, v in by_model.items()}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("runs/flex_vs_fixed"), help="work folder (default: %(default)s)"
    )
    parser.add_argument("--studies", default="main", help=f"comma-separated, of {', '.join(STUDIES)} (default: main)")
    parser.add_argument("--seeds", help="comma-separated seeds for every study (default: each study's own)")
    parser.add_argument("--train-samples", type=int, default=10000, help="synthetic training records")
    parser.add_argument("--test-samples", type=int, default=1000, help="synthetic test records")
    parser.add_argument("--ranks", type=int, default=2, help="training processes per run (default: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="each study's first two models only (main: flex and fixed16), seed 0, 2+4+4 steps, "
                             "240 training records of each kind and 48 test records: checks the study runs end to "
                             "end, measures nothing")
    parser.add_argument("--write-results", action="store_true", help="copy the results into bench/")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    args.studies = args.studies.split(",")
    unknown = sorted(set(args.studies) - set(STUDIES))
    if unknown:
        parser.error(f"unknown study {unknown[0]}; choose from {', '.join(STUDIES)}")
    if min(args.test_samples, args.train_samples) < 1:
        parser.error("--train-samples and --test-samples must be >= 1")
    return args


def studies_to_run(args):
    """{name: Study}, with --seeds and --quick applied."""
    studies = {}
    for name in args.studies:
        study = STUDIES[name]
        if args.quick:
            models = study.models[:QUICK["models"]]
            study = Study(study.question, models, QUICK["seeds"], study.flex,
                          [m for m in study.specialists if m in models], study.counts)
        elif args.seeds:
            study = Study(study.question, study.models, [int(s) for s in args.seeds.split(",")], study.flex,
                          study.specialists, study.counts)
        studies[name] = study
    return studies


def main(argv=None):
    args = parse_args(argv)
    started, load, commit = time.perf_counter(), os.getloadavg()[0], git_commit()
    out = args.out.resolve()
    env = cpu_training_env()
    out.mkdir(parents=True, exist_ok=True)
    studies = studies_to_run(args)
    splits = QUICK["splits"] if args.quick else DATA_SIZES | {"train": args.train_samples, "validation": 300,
                                                              "test": args.test_samples}
    data_settings = out / "data_settings.json"
    if not (data_settings.exists() and json.loads(data_settings.read_text()) == splits):
        make_models_and_data(out, splits, env, log_dir=out)
        data_settings.write_text(json.dumps(splits))

    base = QUICK["steps"] if args.quick else {part: run_config(part).train.max_steps for part in RUNS}
    models = list(dict.fromkeys(m for study in studies.values() for m in study.models))
    costs = per_step_costs(out, sorted({n for m in models + ["flex"] for n in MODELS[m].counts}), args.ranks,
                           QUICK["packer_batches"] if args.quick else PACKER_BATCHES)
    steps = {m: {part: scaled_steps(base[part], costs[part], MODELS[m]) for part in RUNS} for m in models}
    planned = sum(sum(steps[m].values()) for study in studies.values() for m in set(study.models)
                  for _ in study.seeds)
    print(f"per step at N: {costs}\nsteps per model and run: {steps}\n"
          f"at most {planned} training steps in all (fewer where a study reuses another's models)", flush=True)

    settings = {"commit": commit, "date": datetime.date.today().isoformat(),
                "machine": (f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores, no GPU (load average "
                            f"{load:.1f} at the start)"),
                "splits": splits, "base_steps": base, "steps": steps,
                "per_step": costs, "quick": args.quick}
    for name, study in studies.items():
        records = [trained_and_evaluated(m, seed, out, steps[m], study.counts, args.ranks, env)
                   for seed in study.seeds for m in study.models]
        report = write_report(out, args, name, study, settings | {"study": name, "models": study.models,
                                                                  "seeds": study.seeds},
                              records, time.perf_counter() - started)
        print(report.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
