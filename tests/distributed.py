"""Launching real 2-rank CPU training runs (torchrun, gloo, DeepSpeed ZeRO-3) from tests."""

import json
import subprocess
import sys
from pathlib import Path

from tools.demo import cpu_training_env, free_port

REPO = Path(__file__).resolve().parents[1]
STAGE1_STEPS = 16


def torchrun_command(config, output_dir, *overrides, ranks=2, module="pipeline.train"):
    """module: pipeline.train or a test wrapper of it (tests/record_dtypes.py, tests/crash_at_step.py)."""
    # --master_port 0 would hang: DeepSpeed's env:// init does not see the port torchrun picks
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(free_port()),
        "-m",
        module,
        str(REPO / "configs" / config),
        f"train.output_dir={output_dir}",
        "wandb.mode=disabled",
        *overrides,
    ]


def run_training(config, output_dir, *overrides, timeout=300, ranks=2, module="pipeline.train"):
    """Run to completion on `ranks` processes; the combined log lands beside output_dir as <name>.log."""
    result = subprocess.run(torchrun_command(config, output_dir, *overrides, ranks=ranks, module=module), cwd=REPO,
                            env=cpu_training_env(), check=False, capture_output=True, text=True, timeout=timeout)
    (Path(output_dir).parent / f"{Path(output_dir).name}.log").write_text(result.stdout + result.stderr)
    return result


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def stage1_overrides(tiny_models, shards):
    return [f"model.vision_path={tiny_models / 'vision'}", f"model.lm_path={tiny_models / 'qwen2'}",
            f"data.shards={shards}", f"train.max_steps={STAGE1_STEPS}", "train.save_every=4", "data.seq_len=512"]
