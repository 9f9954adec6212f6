"""The training engine, end to end: 2 CPU processes (gloo) under DeepSpeed ZeRO-3, tiny models.

Multi-process runs are slow to start, so a few module fixtures run them once and several
tests read their outputs (metrics.jsonl, checkpoints, the exported model folder).
"""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from pipeline.train.checkpoint import PREEMPTED_EXIT_CODE
from pipeline.train.sampler import TokenCountSampler, check_same_across_ranks
from tests.distributed import REPO, STAGE1_STEPS, metrics, run_training, stage1_overrides, torchrun_command
from tools.demo import cpu_training_env, free_port

STEPS = STAGE1_STEPS
pytestmark = pytest.mark.timeout(600)


def signal_workers(torchrun, sig):
    """Signal the two training processes, torchrun's children, as Slurm or a crash would."""
    pids = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split()
    assert len(pids) == 2, f"expected 2 training processes, found {pids}"
    for pid in pids:
        os.kill(int(pid), sig)


@pytest.fixture(scope="module")
def resumed_stage1(tiny_models, mixture, tmp_path_factory):
    """The same run, SIGKILLed after it has logged 6 steps (past its step-4 checkpoint), then
    started again. Returns the output folder, the steps logged before the kill, the checkpoint
    step it resumed from and the resumed run's log."""
    out = tmp_path_factory.mktemp("resumed") / "run"
    process = subprocess.Popen(torchrun_command("tiny_cpu_stage1.yaml", out, *stage1_overrides(tiny_models, mixture)),
                               cwd=REPO, env=cpu_training_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_file = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics_file.is_file() and '"step": 6,' in metrics_file.read_text()):
        assert process.poll() is None and time.time() < deadline, "first run ended before step 6"
        time.sleep(0.05)
    signal_workers(process, signal.SIGKILL)
    process.kill()
    process.wait()
    killed_at = len(metrics(out))
    checkpoint_step = int((out / "checkpoints" / "latest").read_text().removeprefix("step-"))
    result = run_training("tiny_cpu_stage1.yaml", out, *stage1_overrides(tiny_models, mixture))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, killed_at, checkpoint_step, result.stderr


def test_stage1_trains_only_the_projector_and_loss_goes_down(stage1_run):
    losses = [m["loss"] for m in metrics(stage1_run)]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert {m["num_vision_tokens"] for m in metrics(stage1_run)} <= {16, 64, 144}
    step10 = metrics(stage1_run)[9]
    log = (stage1_run.parent / "run.log").read_text()
    assert "ZeRO-3: checkpoints load straight into partitioned parameters" in log
    assert "gloo network interface: " in log
    assert "projector        trains weights float32" in log  # train.precision fp32: no cast
    assert f"step 10/{STEPS}  N={step10['num_vision_tokens']}  loss {step10['loss']:.4f}" in log


def test_metrics_split_samples_and_loss_by_mixture_source(stage1_run):
    """The stage-1 run trains on a two-source mixture: samples_total/<name> add up to the samples
    the steps packed, and the step's loss is the token-weighted mean of its sources' losses."""
    records = metrics(stage1_run)
    packed = 0
    for record in records:
        packed += round(record["samples_per_s"] * record["step_time_s"])
        assert record["samples_total/synthetic"] + record["samples_total/hard"] == packed
    both = 0
    for record in records:
        by_source = [v for k, v in record.items() if k.startswith("loss_by_source/")]
        if len(by_source) == 1:
            assert by_source[0] == pytest.approx(record["loss"], rel=1e-6)  # the loss sums in fp32
        else:
            assert min(by_source) < record["loss"] < max(by_source)
            both += 1
    assert 0 < both < len(records)


def test_stage1_leaves_frozen_weights_bit_identical(stage1_run, tiny_models):
    final = load_file(stage1_run / "final" / "model.safetensors")
    vision = load_file(tiny_models / "vision" / "model.safetensors")
    lm = load_file(tiny_models / "qwen2" / "model.safetensors")
    for name, tensor in vision.items():
        assert torch.equal(final["vision_tower." + name], tensor), name
    for name, tensor in lm.items():
        assert torch.equal(final["language_model." + name], tensor), name
    original_projector = [k for k in final if k.startswith("projector.")]
    assert original_projector, "projector weights missing from the exported folder"


def test_resume_after_sigkill_reproduces_losses_bitwise(stage1_run, resumed_stage1):
    out, killed_at, checkpoint_step, log = resumed_stage1
    assert 4 <= checkpoint_step <= killed_at < STEPS, "the kill must land between a checkpoint and the end"
    resumed_from = out / "checkpoints" / f"step-{checkpoint_step:06d}"
    assert f"resumed from checkpoint {resumed_from} at step {checkpoint_step}" in log
    uninterrupted, resumed = metrics(stage1_run), metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(uninterrupted, resumed):
        assert (a["step"], a["num_vision_tokens"], a["loss"]) == (b["step"], b["num_vision_tokens"], b["loss"])


def test_checkpoints_keep_last_k_with_atomic_latest(stage1_run):
    ckpt = stage1_run / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step-{STEPS:06d}"
    assert sorted(p.name for p in ckpt.glob("step-*")) == [f"step-{STEPS - 4:06d}", f"step-{STEPS:06d}"]
    state = json.loads((ckpt / f"step-{STEPS:06d}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2


def test_stage2_starts_from_stage1_and_trains_lm(stage1_run, synthetic_shards, tmp_path):
    out = tmp_path / "stage2"
    result = run_training("tiny_cpu_stage2.yaml", out, f"model.init_from={stage1_run / 'final'}",
                          f"data.shards={synthetic_shards}", "train.max_steps=6", "optim.lr=1e-3", "data.seq_len=512",
                          "train.gradient_checkpointing=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "language_model   TRAINS" in result.stderr + result.stdout
    assert "gradient checkpointing on: Qwen2ForCausalLM" in result.stderr
    losses = [m["loss"] for m in metrics(out)]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    before = load_file(stage1_run / "final" / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert not torch.equal(before["language_model.model.layers.0.mlp.up_proj.weight"],
                           after["language_model.model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(before["vision_tower.embeddings.patch_embedding.weight"],
                       after["vision_tower.embeddings.patch_embedding.weight"])


def test_text_only_micro_batch_on_one_rank_does_not_hang(tiny_models, tmp_path):
    """Shards of one sample per batch, half text-only: some steps pair an image rank with a
    text-only rank. The run finishing (under the timeout) is the property."""
    from tools import build_shards, make_synthetic

    make_synthetic.main(["--out", str(tmp_path / "raw"), "--n", "60", "--seed", "5", "--text-only-fraction", "0.5"])
    build_shards.build(str(tmp_path / "raw" / "data.json"), str(tmp_path / "raw"), str(tmp_path / "shards"),
                       samples_per_shard=10)
    out = tmp_path / "run"
    result = run_training("tiny_cpu_stage1.yaml", out, *stage1_overrides(tiny_models, tmp_path / "shards")[:3],
                          "train.max_steps=10", "data.seq_len=160", "data.pack_window=1", "tokens.counts={16: 1}",
                          "train.export_final=false", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    mixed = [m for m in metrics(out) if 0 < m["text_only_ranks"] < 2]
    assert mixed, "no step paired a text-only rank with an image rank; the test data did not exercise the case"


def test_sigusr1_saves_and_exits_with_preempted_code(tiny_models, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    overrides = stage1_overrides(tiny_models, synthetic_shards) + ["train.max_steps=200", "train.save_every=100"]
    process = subprocess.Popen(
        torchrun_command("tiny_cpu_stage1.yaml", out, *overrides),
        cwd=REPO,
        env=cpu_training_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    signal_workers(process, signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and f"exit code {PREEMPTED_EXIT_CODE}" in stderr
    tag = (out / "checkpoints" / "latest").read_text()
    assert int(tag.removeprefix("step-")) == len(metrics(out))


# ---- the sampler, in-process ----

def test_sampler_is_a_pure_function_of_seed_and_step():
    sampler = TokenCountSampler({64: 1, 144: 1, 256: 1}, seed=7)
    draws = [sampler(step) for step in range(300)]
    assert draws == [TokenCountSampler({64: 1, 144: 1, 256: 1}, seed=7)(step) for step in range(300)]
    assert set(draws) == {64, 144, 256}
    assert draws != [TokenCountSampler({64: 1, 144: 1, 256: 1}, seed=8)(step) for step in range(300)]
    assert {TokenCountSampler({144: 1}, seed=3)(s) for s in range(50)} == {144}


def test_sampler_follows_weights():
    sampler = TokenCountSampler({64: 3, 256: 1}, seed=0)
    share = sum(sampler(step) == 64 for step in range(4000)) / 4000
    assert 0.72 < share < 0.78


def _check_worker(rank, port, seeds, stops, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    n = TokenCountSampler({64: 1, 144: 1, 256: 1}, seed=seeds[rank])(step=1)
    try:
        results[rank] = ("stop", check_same_across_ranks(n, stops[rank]))
    except RuntimeError as error:
        results[rank] = ("error", str(error))
    dist.destroy_process_group()


def run_check(seeds, stops):
    results = mp.Manager().dict()
    mp.spawn(_check_worker, args=(free_port(), seeds, stops, results), nprocs=2)
    return dict(results)


def test_rank_check_agrees_and_spreads_a_stop_request():
    results = run_check(seeds=[1, 1], stops=[False, True])
    assert results == {0: ("stop", True), 1: ("stop", True)}


def test_desynchronized_sampler_is_caught_on_every_rank():
    # seeds 0 and 1 draw different N at step 1 (asserted, so the test can't pass vacuously)
    assert TokenCountSampler({64: 1, 144: 1, 256: 1}, 0)(1) != TokenCountSampler({64: 1, 144: 1, 256: 1}, 1)(1)
    results = run_check(seeds=[0, 1], stops=[False, False])
    assert [kind for kind, _ in results.values()] == ["error", "error"]
    assert "ranks disagree on the vision-token count" in results[0][1]
