"""Resuming a 2-rank ZeRO-3 checkpoint with 1 rank, through DeepSpeed's universal checkpoint.

The stage-1 run (keep_last=2, on the two-source mixture) holds step-12 and step-16; a copy cut
back to step 12 resumes on one rank. What must continue: the step, the LR schedule, the weights,
the data's epoch (its remaining samples split over the new layout; the in-process multiset tests
are in tests/test_data_epochs.py) and the job-wide counters. Losses differ from the
uninterrupted run (other batches, no RNG states for the new ranks).

Which samples each step trained on is recorded (tests/record_samples.py) in a shorter pair of
runs: 2 ranks on an 80-sample epoch saving mid-epoch, then 1 rank from that save to past the
epoch's end.
"""

import collections
import json
import shutil

import pytest

from pipeline.export.convert import convert_checkpoint
from pipeline.model.vlm import TokenFlexVLM
from tests.distributed import STAGE1_STEPS, metrics, run_training, stage1_overrides
from tests.test_data_epochs import sample_key, samples_past_epoch_0, shard_keys

RESUME_AT = 12
pytestmark = pytest.mark.timeout(600)


def cut_back(run, out, step):
    """A copy of a finished run as it stood after its checkpoint at `step`: the later checkpoints,
    final/ and the later metrics left out."""
    shutil.copytree(run, out)
    ckpt = out / "checkpoints"
    for later in [p for p in ckpt.glob("step-*") if int(p.name.removeprefix("step-")) > step]:
        shutil.rmtree(later)
    shutil.rmtree(out / "final")
    (ckpt / "latest").write_text(f"step-{step:06d}")
    lines = (out / "metrics.jsonl").read_text().splitlines()[:step]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def one_rank_resume(stage1_run, tiny_models, mixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_world_size") / "run"
    cut_back(stage1_run, out, RESUME_AT)
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


TWO_SHARDS = "shard-{000000..000001}.tar"  # of the synthetic shards: 80 samples an epoch
RECORDED_STEPS, RECORDED_RESUME_AT, PACK_WINDOW = 20, 4, 8


@pytest.fixture(scope="module")
def recorded_resume(tiny_models, synthetic_shards, tmp_path_factory):
    """The samples of each step (tests/record_samples.py, a folder per run): a 2-rank stage-1 run
    of RECORDED_STEPS steps on TWO_SHARDS, and a copy of it cut back to step RECORDED_RESUME_AT
    resumed on one rank to the same end."""
    root = tmp_path_factory.mktemp("recorded_resume")
    overrides = [*stage1_overrides(tiny_models, synthetic_shards / TWO_SHARDS), f"train.max_steps={RECORDED_STEPS}",
                 "train.save_every=4", "train.keep_last=8", f"data.pack_window={PACK_WINDOW}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECORD_SAMPLES", str(root / "two_ranks"))
        result = run_training("tiny_cpu_stage1.yaml", root / "run", *overrides, module="tests.record_samples")
        assert result.returncode == 0, result.stderr[-3000:]
        cut_back(root / "run", root / "resumed", RECORDED_RESUME_AT)
        patch.setenv("RECORD_SAMPLES", str(root / "one_rank"))
        result = run_training("tiny_cpu_stage1.yaml", root / "resumed", *overrides, ranks=1,
                              module="tests.record_samples")
        assert result.returncode == 0, result.stderr[-3000:]
    return root / "two_ranks", root / "one_rank"


def recorded_steps(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_with_fewer_ranks_consumes_the_rest_of_the_epoch_once(recorded_resume, synthetic_shards):
    """The samples seen: the 2-rank run saved mid-epoch (some of epoch 0 consumed, none of epoch
    1); from that save the one rank consumed the rest of epoch 0, so that over the job every
    sample of it came exactly once, and ran on past its end (at least two pack windows of samples
    after the last one of epoch 0) with none of it coming again."""
    two_ranks, one_rank = recorded_resume
    keys = shard_keys(str(synthetic_shards / TWO_SHARDS))
    assert len(keys) == 80
    ranks = [recorded_steps(two_ranks / f"rank-{r}.jsonl") for r in range(2)]
    assert [len(steps) for steps in ranks] == [RECORDED_STEPS] * 2
    before = [s for steps in ranks for step in steps[:RECORDED_RESUME_AT] for s in step]
    assert {s[-1] for s in before} == {0} and 0 < len(before) < len(keys)  # saved mid-epoch
    assert sorted(p.name for p in one_rank.iterdir()) == ["rank-0.jsonl"]
    after_steps = recorded_steps(one_rank / "rank-0.jsonl")
    assert len(after_steps) == RECORDED_STEPS - RECORDED_RESUME_AT
    after = [s for step in after_steps for s in step]
    epoch_0 = collections.Counter(sample_key(s) for s in before + after if s[-1] == 0)
    assert set(epoch_0) == keys and set(epoch_0.values()) == {1}
    assert samples_past_epoch_0(after) >= 2 * PACK_WINDOW
