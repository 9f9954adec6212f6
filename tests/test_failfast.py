"""A crash ends the run fast: the failing rank and its peers exit non-zero, loader workers included.

The 2-rank run starts its processes the way srun does (RANK, WORLD_SIZE, MASTER_* in the
environment, no launcher agent to kill the survivors), so each process has to end by itself.
The loader tests run TrainBatches alone in a subprocess: no DeepSpeed, a few seconds each.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from transformers.utils import is_flash_attn_2_available

from tests.distributed import REPO, stage1_overrides
from tools.demo import cpu_training_env, free_port

pytestmark = pytest.mark.timeout(600)


def leftover_processes(pattern):
    """Pids of live processes whose command line contains pattern (loader workers share their parent's)."""
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def kill_leftovers(pattern):
    for pid in leftover_processes(pattern):
        os.kill(int(pid), signal.SIGKILL)


def start_ranks(module, output_dir, overrides, env, ranks=2):
    """One process per rank, as srun starts them; their output goes to rank-<r>.log beside output_dir."""
    port = free_port()
    processes = []
    command = [sys.executable, "-m", module, str(REPO / "configs" / "tiny_cpu_stage1.yaml"),
               f"train.output_dir={output_dir}", "wandb.mode=disabled", *overrides]
    for rank in range(ranks):
        rank_env = dict(cpu_training_env(), **env, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(output_dir.parent / f"rank-{rank}.log", "w") as log:
            processes.append(subprocess.Popen(command, cwd=REPO, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
    return processes


LOADER_SCRIPT = """
import sys, time
from transformers import AutoImageProcessor
from pipeline.model.chat import load_tokenizer
from pipeline.run.config import DataConfig
from pipeline.data import TrainBatches

models, shards, ending = sys.argv[1:]
data = TrainBatches(DataConfig(shards=shards, seq_len=512, num_workers=2), load_tokenizer(models + "/qwen2"),
                    AutoImageProcessor.from_pretrained(models + "/vision"))
data.next_batch(16)
print("ready", flush=True)
if ending == "sleep":
    time.sleep(600)
raise RuntimeError("failure in the training step")
"""


def start_loader(tiny_models, shards, ending):
    """A process holding TrainBatches with 2 workers; returns it and its workers' pids once it has a batch."""
    process = subprocess.Popen([sys.executable, "-c", LOADER_SCRIPT, str(tiny_models), str(shards), ending], cwd=REPO,
                               env=cpu_training_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n", process.communicate()[1][-3000:]
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    return process, [int(pid) for pid in workers]


def alive(pid):
    """Running, not a zombie (a killed orphan waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_an_exception_with_loader_workers_exits_at_once(tiny_models, synthetic_shards):
    process, workers = start_loader(tiny_models, synthetic_shards, "raise")
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1 and "RuntimeError: failure in the training step" in stderr, stderr[-3000:]
    assert not any(alive(pid) for pid in workers)


def test_loader_workers_outlive_a_stop_signal_but_not_their_process(tiny_models, synthetic_shards):
    process, workers = start_loader(tiny_models, synthetic_shards, "sleep")
    try:
        for pid in workers:  # as Slurm signals every process of a job step before preemption
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGUSR1)
        time.sleep(1)
        assert all(alive(pid) for pid in workers), "a loader worker died of a stop signal its process must outlive"
        process.kill()  # SIGKILL, as the kernel's OOM killer or srun after a failed task does
        process.wait()
        deadline = time.time() + 1  # torch's own check of the parent takes up to 5 s
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers), "a loader worker outlived its process"
    finally:
        process.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_exception_on_one_rank_ends_every_process_within_a_minute(tiny_models, synthetic_shards, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "fault-injected"
    overrides = [*stage1_overrides(tiny_models, synthetic_shards), "train.max_steps=50", "data.num_workers=2"]
    processes = start_ranks("tests.crash_at_step", out, overrides,
                            {"FAULT_AT_STEP": "3", "FAULT_RAISE_RANK": "1", "FAULT_MARKER": str(marker)})
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert time.time() < deadline and all(p.poll() is None for p in processes), "no fault was injected"
            time.sleep(0.2)
        for process in processes:
            process.wait(timeout=max(1, float(marker.read_text()) + 60 - time.time()))
        assert [p.returncode for p in processes] == [1, 1]
        logs = [(tmp_path / f"rank-{rank}.log").read_text() for rank in range(2)]
        assert "Traceback" in logs[0], logs[0][-3000:]
        assert "RuntimeError: injected fault on rank 1 at step 3" in logs[1], logs[1][-3000:]
        assert leftover_processes(str(out)) == [], "a training process or loader worker outlived the run"
    finally:
        kill_leftovers(str(out))


# ---- config errors at start-up, before any process group or DeepSpeed start-up ----

def start_up_error(capsys, *overrides, config="tiny_cpu_stage1.yaml"):
    """pipeline.train.entry.main's exit code 2 and its message, for a config that must fail its checks."""
    from pipeline.train.entry import main

    assert main([str(REPO / "configs" / config), "wandb.mode=disabled", *overrides]) == 2
    return capsys.readouterr().err


def test_token_count_beyond_the_vision_grid_fails_at_start(tiny_models, synthetic_shards, tmp_path, capsys):
    stage1 = stage1_overrides(tiny_models, synthetic_shards)[:3]
    error = start_up_error(capsys, *stage1, f"train.output_dir={tmp_path}", "tokens.counts={64: 1, 324: 1}")
    assert "tokens.counts: num_vision_tokens=324 asks for a 18x18 grid, larger than the encoder's 16x16" in error

    from pipeline.model.vlm import TokenFlexVLM  # stage 2 reads the grid from its model folder's config.json

    TokenFlexVLM.from_components(tiny_models / "vision", tiny_models / "qwen2").save_pretrained(tmp_path / "folder")
    error = start_up_error(capsys, f"model.init_from={tmp_path / 'folder'}", f"data.shards={synthetic_shards}",
                           f"train.output_dir={tmp_path}", "tokens.counts={324: 1}", config="tiny_cpu_stage2.yaml")
    assert "tokens.counts: num_vision_tokens=324" in error


@pytest.mark.parametrize("text, named", [("64", "data.text_tokens_per_image"), ("auto", "a minimum of text")])
def test_seq_len_without_room_for_text_at_the_largest_n_fails_at_start(
        tiny_models, synthetic_shards, tmp_path, capsys, text, named):
    stage1 = stage1_overrides(tiny_models, synthetic_shards)[:3]
    error = start_up_error(capsys, *stage1, f"train.output_dir={tmp_path}", "tokens.counts={16: 1, 144: 1}",
                           "data.seq_len=200", f"data.text_tokens_per_image={text}")
    assert "data.seq_len=200 can't hold the largest image with its text at N=144" in error
    assert f"data.max_tiles=1 tiles at max(tokens.counts) + {named} = 144 + 64 = 208" in error


def test_seq_len_without_room_for_the_largest_tiled_image_fails_at_start(tiny_models, synthetic_shards, tmp_path,
                                                                          capsys):
    """With data.max_tiles 6 the largest image is a 6 x 1 grid and its thumbnail: 7 tiles x N
    slots plus a row end per grid row, 7 x 64 + 6 = 454 at N=64; 470 tokens hold it, not its text."""
    stage1 = stage1_overrides(tiny_models, synthetic_shards)[:3]
    error = start_up_error(capsys, *stage1, f"train.output_dir={tmp_path}", "tokens.counts={16: 1, 64: 1}",
                           "data.seq_len=470", "data.max_tiles=6", "data.text_tokens_per_image=20")
    assert "data.seq_len=470 can't hold the largest image with its text at N=64" in error
    assert "data.max_tiles=6 tiles at max(tokens.counts) + data.text_tokens_per_image = 454 + 20 = 474" in error


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_flash_attention_with_fp32_weights_fails_at_start(tiny_models, synthetic_shards, tmp_path, capsys, precision):
    """On a GPU, flash-attn would crash at the first forward on fp32 weights; auto is fp32 on CPU."""
    stage1 = stage1_overrides(tiny_models, synthetic_shards)[:3]
    error = start_up_error(capsys, *stage1, f"train.output_dir={tmp_path}",
                           "model.attn_implementation=flash_attention_2", f"train.precision={precision}")
    assert "model.attn_implementation=flash_attention_2 needs bf16 weights" in error
    assert f"train.precision={precision} trains in fp32 here" in error


@pytest.mark.skipif(is_flash_attn_2_available(), reason="flash-attn and a GPU are here, so flash_attention_2 runs")
def test_flash_attention_without_flash_attn_or_gpu_fails_at_start(tiny_models, synthetic_shards, tmp_path, capsys):
    """Before the process group and DeepSpeed start, not when the model is built."""
    stage1 = stage1_overrides(tiny_models, synthetic_shards)[:3]
    error = start_up_error(capsys, *stage1, f"train.output_dir={tmp_path}",
                           "model.attn_implementation=flash_attention_2", "train.precision=bf16")
    assert ("model.attn_implementation: attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn"
            in error)


@pytest.fixture
def checkpointed_run(stage1_run, tmp_path):
    """An output_dir holding the real stage-1 run's `latest` and its trainer_state.json only."""
    source, target = stage1_run / "checkpoints", tmp_path / "run" / "checkpoints"
    tag = (source / "latest").read_text()
    (target / tag).mkdir(parents=True)
    for name in ("latest", f"{tag}/trainer_state.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return tmp_path / "run"


@pytest.mark.parametrize("change, named", [("tokens.counts={16: 1, 64: 1}", "tokens.counts is {16: 1.0, 64: 1.0}"),
                                           ("tokens.seed=1", "tokens.seed is 1 but was 0")])
def test_resume_with_other_token_counts_or_seed_fails_unless_allowed(
        checkpointed_run, tiny_models, synthetic_shards, capsys, change, named):
    from pipeline.run.config import load_config
    from pipeline.train.preflight import check_inputs

    stage1 = [*stage1_overrides(tiny_models, synthetic_shards)[:3], f"train.output_dir={checkpointed_run}"]
    error = start_up_error(capsys, *stage1, change)
    assert named in error and "tokens.allow_change_on_resume=true" in error
    config = REPO / "configs" / "tiny_cpu_stage1.yaml"
    check_inputs(load_config(config, [*stage1, change, "tokens.allow_change_on_resume=true"]))
    check_inputs(load_config(config, stage1))  # the checkpoint's own counts and seed
