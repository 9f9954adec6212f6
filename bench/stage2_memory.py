"""Peak host memory per rank while stage 2 starts: the model built from a model folder, then the
DeepSpeed ZeRO-3 engine, two ways (2 CPU ranks on gloo, bf16, results in bench/stage2_memory_results.md):

  whole        every rank loads the whole folder in fp32, then DeepSpeed partitions it (how stage 2
               started before 2026-12: TokenFlexVLM.from_pretrained)
  partitioned  the tower and the LM are built straight into ZeRO-3 partitions and rank 0 reads
               each tensor into them (pipeline.engine.zero3.load_model_folder, what stage 2 does now)

Each rank reports its peak RSS above what it held before the model was built, once the model is
built and once the engine is. The folder holds the tiny SigLIP tower and a Qwen2 LM of --lm-layers
layers of width 768 (101M parameters in all at the default 12), so that the weights, not Python, show.
On CPU the engine's partitions, fp32 master weights and moments also live in host memory; on a
GPU they do not, and what the whole way adds is the host copy; the "model built" column is the
comparison. Rank 0's figure includes the pages of the weights file it maps. From the shapes, the
table then gives a 7B LM (Qwen2-7B) with SigLIP-so400m at 8 ranks per node.

    python -m bench.stage2_memory --write-results
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import torch

from tools.demo import free_port

RESULTS = Path(__file__).with_name("stage2_memory_results.md")
WAYS = ("whole", "partitioned")
GIB = 2**30
# Qwen2-7B and SigLIP-so400m, as bench/train_step.py shapes them, and the projector between them
SEVEN_B = {"lm": 7.62e9, "tower": 0.43e9, "projector": 1152 * 3584 * 2 + 3584 * 3584}
SHARD_BYTES = 5e9  # save_pretrained's default max_shard_size: rank 0 maps one weights file at a time


def make_folder(work: Path, lm_layers: int) -> Path:
    """A model folder: the tiny tower and tokenizer, a Qwen2 LM of lm_layers layers of width 768."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline.model.chat import load_tokenizer
    from pipeline.model.vlm import TokenFlexVLM
    from tools.make_tiny_models import make_tiny_models

    tiny = make_tiny_models(work / "tiny")
    lm = Qwen2ForCausalLM(Qwen2Config(hidden_size=768, intermediate_size=2048, num_hidden_layers=lm_layers,
                                      num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                                      tie_word_embeddings=True))
    lm.save_pretrained(work / "lm")
    load_tokenizer(tiny / "qwen2").save_pretrained(work / "lm")
    TokenFlexVLM.from_components(tiny / "vision", work / "lm").save_pretrained(work / "folder")
    return work / "folder"


def rank_peaks(way: str, folder: Path) -> dict:
    """Run on one rank (under torchrun): build the model one way, then the engine; the peak RSS above the start."""
    from pipeline.engine.engine import build_engine, numel
    from pipeline.engine.zero3 import load_model_folder
    from pipeline.model.vlm import TokenFlexVLM
    from pipeline.run.config import load_config
    from pipeline.train.distributed import init_process_group
    from stages import STAGES

    init_process_group(10)
    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny_cpu_stage2.yaml",
                      [f"model.init_from={folder}", "train.precision=bf16"])
    start = psutil.Process().memory_info().rss
    model = TokenFlexVLM.from_pretrained(folder) if way == "whole" else load_model_folder(folder, cfg)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    STAGES["finetune"].freeze_backbones(model, cfg)
    build_engine(model, STAGES["finetune"].param_groups(model, cfg), cfg)
    engine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    return {"model": built / GIB, "engine": engine / GIB, "parameters": sum(numel(p) for p in model.parameters())}


def measure(way: str, folder: Path, work: Path) -> list[dict]:
    """Both ranks' peaks for one way."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "bench.stage2_memory", "--worker", way,
               "--folder", str(folder), "--work", str(work)]
    subprocess.run(command, check=True, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    return [json.loads((work / f"{way}-rank-{rank}.json").read_text()) for rank in range(2)]


def seven_b_rows() -> list[str]:
    """Host memory per node at 8 ranks, from the shapes: whole = every rank's fp32 copy of the
    model (the measured peak above is about twice that: the weights read, then copied into the
    model); partitioned = every rank's fp32 projector, plus the weights file rank 0 maps while it
    reads it (file pages, which the kernel can drop)."""
    whole = 8 * 4 * (SEVEN_B["lm"] + SEVEN_B["tower"] + SEVEN_B["projector"]) / GIB
    partitioned = (8 * 4 * SEVEN_B["projector"] + SHARD_BYTES) / GIB
    return [f"| Qwen2-7B + SigLIP-so400m, 8 ranks per node (computed) | {whole:.0f} GiB per node | "
            f"{partitioned:.1f} GiB per node |"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-layers", type=int, default=12, help="layers of the benchmark's LM (default: 12)")
    parser.add_argument("--write-results", action="store_true", help=f"write {RESULTS.name}")
    parser.add_argument("--worker", choices=WAYS, help="internal: one rank of one way")
    parser.add_argument("--folder", type=Path, help="internal: the model folder")
    parser.add_argument("--work", type=Path, help="internal: where ranks write their peaks")
    args = parser.parse_args(argv)
    if args.worker:
        rank = int(os.environ["RANK"])
        (args.work / f"{args.worker}-rank-{rank}.json").write_text(json.dumps(rank_peaks(args.worker, args.folder)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = make_folder(work, args.lm_layers)
        peaks = {way: measure(way, folder, work) for way in WAYS}
    parameters = peaks["whole"][0]["parameters"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"Run {datetime.date.today()} at commit {commit} on {os.cpu_count()} CPU cores "
             f"({platform.machine()}), torch {torch.__version__}: "
             f"`python -m bench.stage2_memory --lm-layers {args.lm_layers}`. Model folder: "
             f"{parameters / 1e6:.0f}M parameters ({4 * parameters / GIB:.2f} GiB in fp32). Peak RSS per rank "
             f"above its start, rank 0 / rank 1:", "",
             "| way | model built | engine built |", "|---|---|---|"]
    for way in WAYS:
        model, engine = ("/".join(f"{rank[key]:.2f}" for rank in peaks[way]) for key in ("model", "engine"))
        lines.append(f"| {way} | {model} GiB | {engine} GiB |")
    lines += ["", "| what | whole | partitioned |", "|---|---|---|", *seven_b_rows()]
    print("\n".join(lines))
    if args.write_results:
        what = (__doc__ or "").split("\n\n    python -m")[0]
        heading = "# Stage 2's start-up: peak host memory per rank"
        RESULTS.write_text(f"{heading}\n\n{what}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
