"""Resuming a 2-rank ZeRO-3 checkpoint with 1 rank, through DeepSpeed's universal checkpoint.

The stage-1 run (keep_last=2, on the two-source mixture) holds step-12 and step-16; a copy cut
back to step 12 resumes on one rank. What must continue: the step, the LR schedule, the weights,
the data's epoch (its remaining samples split over the new layout; the in-process multiset tests
are in tests/test_data_epochs.py) and the job-wide counters. Losses differ from the
uninterrupted run (other batches, no RNG states for the new ranks).
"""

import json
import shutil

import pytest

from pipeline.export.convert import convert_checkpoint
from pipeline.model.vlm import TokenFlexVLM
from tests.distributed import STAGE1_STEPS, metrics, run_training, stage1_overrides

RESUME_AT = 12
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def one_rank_resume(stage1_run, tiny_models, mixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_world_size") / "run"
    shutil.copytree(stage1_run, out)
    ckpt = out / "checkpoints"
    for later in [p for p in ckpt.glob("step-*") if int(p.name.removeprefix("step-")) > RESUME_AT]:
        shutil.rmtree(later)
    shutil.rmtree(out / "final")
    (ckpt / "latest").write_text(f"step-{RESUME_AT:06d}")
    lines = (out / "metrics.jsonl").read_text().splitlines()[:RESUME_AT]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = run_training("tiny_cpu_stage1.yaml", out, *stage1_overrides(tiny_models, mixture),
                          "train.save_every=1", "train.keep_last=8", ranks=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout + result.stderr


def test_resume_with_fewer_ranks_continues_step_and_schedule(stage1_run, one_rank_resume):
    out, log = one_rank_resume
    ckpt = out / "checkpoints"
    assert f"resumed from checkpoint {ckpt / f'step-{RESUME_AT:06d}'} at step {RESUME_AT}" in log
    assert "was written by 2 ranks, this run has 1" in log
    assert "data state saved by 2 ranks x 1 workers, resumed by 1 x 1: epoch 0 continues" in log
    assert (ckpt / f"step-{RESUME_AT:06d}-universal").is_dir()
    assert not (ckpt / f"step-{RESUME_AT:06d}-universal.tmp").exists()
    resumed, uninterrupted = metrics(out), metrics(stage1_run)
    assert [m["step"] for m in resumed] == list(range(1, STAGE1_STEPS + 1))
    for a, b in zip(uninterrupted[RESUME_AT:], resumed[RESUME_AT:]):
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12, abs=0), b["step"]
    state = json.loads((ckpt / f"step-{RESUME_AT + 1:06d}" / "trainer_state.json").read_text())
    assert state["step"] == RESUME_AT + 1 and state["world_size"] == 1
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_with_fewer_ranks_carries_on_the_job_totals(one_rank_resume):
    """Counters are per rank and the metrics sum them over ranks: after the resume the one rank
    carries the job's totals on, so they neither drop (rank 0's alone) nor jump."""
    out, _ = one_rank_resume
    before, after = metrics(out)[RESUME_AT - 1], metrics(out)[RESUME_AT]
    sources = [k for k in before if k.startswith("samples_total/")]
    assert sorted(sources) == ["samples_total/hard", "samples_total/synthetic"]
    step_samples = sum(after[k] - before[k] for k in sources)
    assert step_samples > 0 and all(after[k] >= before[k] for k in sources)
    assert after["epoch"] == before["epoch"] == 0  # the epoch goes on
    for counter in ("truncated_total", "skipped_corrupt_total"):
        assert before[counter] > 0, counter  # the mixture's `hard` source has long prompts and corrupt images
        # a step reads up to a pack window (64) ahead of what it packs, and counts corrupt samples as it reads
        assert before[counter] <= after[counter] <= before[counter] + step_samples + 64, counter


def test_resume_with_fewer_ranks_loads_the_trained_weights(one_rank_resume, tiny_models, tmp_path):
    """One step after the resume the projector is one optimizer step from the step-12 weights:
    far closer to them than a freshly initialised projector is (it was not re-initialised)."""
    out, _ = one_rank_resume
    ckpt = out / "checkpoints"
    saved = convert_checkpoint(ckpt, tmp_path / "saved", tag=f"step-{RESUME_AT:06d}")
    after = convert_checkpoint(ckpt, tmp_path / "after", tag=f"step-{RESUME_AT + 1:06d}")
    fresh = TokenFlexVLM.from_components(tiny_models / "vision", tiny_models / "qwen2").state_dict()
    names = [k for k in saved if k.startswith("projector.")]
    assert names

    def distance(a, b):
        return sum(float((a[k].detach().float() - b[k].detach().float()).pow(2).sum()) for k in names) ** 0.5

    one_step, from_fresh = distance(after, saved), distance(saved, fresh)
    assert 0 < one_step < from_fresh / 10, (one_step, from_fresh)
