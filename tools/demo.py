"""The whole pipeline end to end on CPU, in a few minutes, with tiny real models:

  tiny models -> synthetic shards -> stage 1 (2 ranks, ZeRO-3) -> stage 2 (2 ranks)
  -> checkpoint conversion -> greedy generation at N = 64, 144, 256 -> evaluation table and plot

Every step is one of the project's own commands, printed before it runs, so the demo doubles as
a worked example of what to run on a cluster.
"""

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_training_env():
    """Environment for training processes on CPU (gloo): one thread each, DeepSpeed's CPU
    accelerator, and torch 2.13's per-collective FutureWarning silenced (it buries the output)."""
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore::FutureWarning",
                WANDB_SILENT="true", PYTHONPATH=str(REPO))


def run(title, command, env):
    print(f"\n=== {title}\n$ {' '.join(str(c) for c in command)}", flush=True)
    started = time.perf_counter()
    subprocess.run([str(c) for c in command], cwd=REPO, env=env, check=True)
    print(f"--- {title}: {time.perf_counter() - started:.1f} s", flush=True)


def torchrun(ranks):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", ranks, "--master_port", free_port()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything goes (default: runs/demo)")
    parser.add_argument("--ranks", type=int, default=2, help="training processes (default: 2)")
    parser.add_argument("--samples", type=int, default=1200, help="synthetic training records (default: 1200)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    env = cpu_training_env()
    py = sys.executable

    run("tiny random-init SigLIP, Qwen2 and Llama, and a sentencepiece tokenizer",
        [py, "-m", "tools.make_tiny_models", out / "tiny"], env)
    for split, count, seed in (("train", args.samples, 0), ("heldout", 200, 1)):
        run(f"synthetic {split} data", [py, "-m", "tools.make_synthetic", "--out", out / "synthetic" / split,
                                        "--n", count, "--seed", seed], env)
        run(f"{split} shards", [py, "-m", "tools.build_shards", "--json", out / "synthetic" / split / "data.json",
                                "--image-root", out / "synthetic" / split, "--out", out / "shards" / split,
                                "--samples-per-shard", 200], env)

    paths = [f"data.shards={out / 'shards' / 'train'}"]
    run("stage 1: align the projector (vision tower and LM frozen)",
        [*torchrun(args.ranks), "-m", "pipeline.train", "configs/tiny_cpu_stage1.yaml", *paths,
         f"model.vision_path={out / 'tiny' / 'vision'}", f"model.lm_path={out / 'tiny' / 'qwen2'}",
         f"train.output_dir={out / 'stage1'}"], env)
    run("stage 2: finetune projector and LM from stage 1's exported folder",
        [*torchrun(args.ranks), "-m", "pipeline.train", "configs/tiny_cpu_stage2.yaml", *paths,
         f"model.init_from={out / 'stage1' / 'final'}", f"train.output_dir={out / 'stage2'}"], env)
    run("convert stage 2's ZeRO-3 checkpoint into a model folder",
        [py, "-m", "tools.convert_checkpoint", out / "stage2" / "checkpoints", out / "model"], env)

    image = sorted((out / "synthetic" / "heldout" / "images").iterdir())[0]
    run("greedy generation at three token counts",
        [py, "-m", "tools.generate", out / "model", "--image", image, "--prompt", "What colour is the background?",
         "--tokens", "64,144,256"], env)
    run("evaluation on held-out shards at several token counts",
        [py, "-m", "tools.evaluate", out / "model", "--shards", out / "shards" / "heldout",
         "--tokens", "16,36,64,100,144,196,256", "--out", out / "eval"], env)
    print(f"\nDone. Table: {out / 'eval' / 'results.md'}  Plot: {out / 'eval' / 'accuracy_vs_tokens.png'}")
    print(f"Training metrics: {out / 'stage1' / 'metrics.jsonl'}, {out / 'stage2' / 'metrics.jsonl'} "
          f"(wandb offline runs under each stage's wandb/)")


if __name__ == "__main__":
    main()
