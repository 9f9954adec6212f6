"""The whole pipeline end to end on CPU, in about a quarter of an hour, with tiny real models:

  tiny models -> synthetic shards -> stage 1 (2 ranks, ZeRO-3) -> stage 2 in two parts (2 ranks)
  -> checkpoint conversion -> greedy generation at N = 64, 144, 256 -> evaluation table and plot

Every step is one of the project's own commands, printed before it runs, so the demo doubles as
a worked example of what to run on a cluster.
"""

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SAMPLES = 10000  # synthetic training records: stage 2 makes nearly two passes
EVAL_SAMPLES = 200  # records of the validation and of the test split
# The data sets the demo makes: name -> tools.make_synthetic options (besides --out and --n).
# train_fine: other training scenes (seed 1), each asked the fine question alone, for stage 2's first part.
SYNTHETIC = {
    "train": ["--split", "train"],
    "train_fine": ["--split", "train", "--seed", "1", "--fine-fraction", "1", "--multi-turn-fraction", "0",
                   "--text-only-fraction", "0"],
    "validation": ["--split", "validation"],
    "test": ["--split", "test"],
}
DATA_SIZES = {"train": TRAIN_SAMPLES, "train_fine": 9000, "validation": EVAL_SAMPLES, "test": EVAL_SAMPLES}
# The demo's training runs in order, each (config, training data set); each starts from the run
# before's exported folder (stage 1 from the tiny models). Stage 2 is a curriculum of two runs:
# the tiny LM learns to tell the left dot from the right one when that question is all it is
# asked, not when it is mixed with the easier ones from the start (bench/fine_question_trials.md).
RUNS = {
    "stage1": ("configs/tiny_cpu_stage1.yaml", "train"),
    "stage2_fine": ("configs/tiny_cpu_stage2_fine.yaml", "train_fine"),
    "stage2": ("configs/tiny_cpu_stage2.yaml", "train"),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_training_env():
    """Environment for training processes on CPU (gloo): one thread each, DeepSpeed's CPU
    accelerator, and torch 2.13's per-collective FutureWarning silenced (it buries the output)."""
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore::FutureWarning",
                WANDB_SILENT="true", PYTHONPATH=str(REPO))


def run(title, command, env, log=None):
    """Run a command from the repo root, printed first; log: a file for its output instead of the console."""
    print(f"\n=== {title}\n$ {' '.join(str(c) for c in command)}", flush=True)
    started = time.perf_counter()
    with open(log, "w") if log else contextlib.nullcontext() as output:
        subprocess.run([str(c) for c in command], cwd=REPO, env=env, check=True, stdout=output,
                       stderr=subprocess.STDOUT if log else None)
    print(f"--- {title}: {time.perf_counter() - started:.1f} s", flush=True)


def torchrun(ranks):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", ranks, "--master_port", free_port()]


def make_models_and_data(out, sizes, env, log_dir=None):
    """OUT/tiny (models), OUT/synthetic/<name> (records and images) and OUT/shards/<name> for each
    data set of SYNTHETIC in sizes ({name: records}, as DATA_SIZES): the splits own disjoint scenes
    and text questions (tools.make_synthetic --split)."""
    py = sys.executable

    def log(name):
        return Path(log_dir) / f"{name}.log" if log_dir else None

    run("tiny models: SigLIP pretrained for a minute on generated scenes, random-init Qwen2 and Llama, "
        "and a sentencepiece tokenizer",
        [py, "-m", "tools.make_tiny_models", out / "tiny"], env, log("tiny_models"))
    # At least 8 shards of each data set: every training rank x loader worker reads its own.
    for name, count in sizes.items():
        run(f"synthetic {name} data", [py, "-m", "tools.make_synthetic", "--out", out / "synthetic" / name,
                                       "--n", count, *SYNTHETIC[name]], env, log(f"synthetic_{name}"))
        run(f"{name} shards", [py, "-m", "tools.build_shards", "--input", out / "synthetic" / name / "data.json",
                               "--image-root", out / "synthetic" / name, "--out", out / "shards" / name,
                               "--samples-per-shard", max(1, min(500, count // 8))], env, log(f"shards_{name}"))


def stage_command(name, data_root, output_dir, ranks, *overrides):
    """torchrun ... pipeline.train for the training run `name` of RUNS, on its data set's shards
    under data_root: the first from data_root's tiny models, the others from output_dir's sibling
    <run before>/final."""
    config, data = RUNS[name]
    names = list(RUNS)
    before = names[names.index(name) - 1] if name != names[0] else None
    start = ([f"model.init_from={output_dir.parent / before / 'final'}"] if before else
             [f"model.vision_path={data_root / 'tiny' / 'vision'}", f"model.lm_path={data_root / 'tiny' / 'qwen2'}"])
    return [*torchrun(ranks), "-m", "pipeline.train", config, f"data.shards={data_root / 'shards' / data}", *start,
            f"train.output_dir={output_dir}", *overrides]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="where everything goes (default: runs/demo)"
    )
    parser.add_argument("--ranks", type=int, default=2, help="training processes (default: 2)")
    parser.add_argument("--samples", type=int, default=TRAIN_SAMPLES,
                        help=f"synthetic training records (default: {TRAIN_SAMPLES})")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    env = cpu_training_env()
    py = sys.executable

    make_models_and_data(out, DATA_SIZES | {"train": args.samples}, env)
    run("stage 1: align the projector (vision tower and LM frozen)",
        stage_command("stage1", out, out / "stage1", args.ranks), env)
    run("stage 2, first part: finetune projector and LM (vision tower frozen) on the fine question alone, "
        "from stage 1's exported folder", stage_command("stage2_fine", out, out / "stage2_fine", args.ranks), env)
    run("stage 2: finetune on all questions, from the first part's exported folder",
        stage_command("stage2", out, out / "stage2", args.ranks), env)
    run("convert stage 2's ZeRO-3 checkpoint into a model folder",
        [py, "-m", "tools.convert_checkpoint", out / "stage2" / "checkpoints", out / "model"], env)

    image = sorted((out / "synthetic" / "test" / "images").iterdir())[0]
    run("greedy generation at three token counts",
        [py, "-m", "tools.generate", out / "model", "--image", image, "--prompt", "What colour is the background?",
         "--tokens", "64,144,256"], env)
    run("evaluation on the test split at several token counts",
        [py, "-m", "tools.evaluate", out / "model", "--shards", out / "shards" / "test",
         "--tokens", "16,36,64,100,144,196,256", "--out", out / "eval"], env)
    print(f"\nDone. Table: {out / 'eval' / 'results.md'}  Plot: {out / 'eval' / 'accuracy_vs_tokens.png'}")
    print(f"Training metrics: metrics.jsonl in {', '.join(str(out / name) for name in RUNS)} "
          f"(wandb offline runs under each one's wandb/)")


if __name__ == "__main__":
    main()
