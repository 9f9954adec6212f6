"""bench/video_study: its summary over seeds, the same-budget pairs, and its --quick run end to end."""

import json
import subprocess
import sys

import pytest

from bench.video_study import EVAL_FRAME_COUNTS, EVAL_FRAMES, budget_pairs, summarise
from tests.distributed import REPO


def run(frames, m, seed, accuracy):
    return {"num_frames": frames, "num_frame_tokens": m, "seed": seed, "accuracy": accuracy,
            "vision_tokens_per_clip": frames * (m + 1), "accuracy_by_type": {"video_first": accuracy / 2}}


def test_summary_is_mean_and_half_range_over_seeds_and_pairs_a_budget_across_frame_counts():
    results = [run(frames, m, seed, accuracy) for frames in (2, 8) for m in EVAL_FRAME_COUNTS
               for seed, accuracy in ((0, 0.5 if frames == 8 else 0.2), (1, 0.7 if frames == 8 else 0.2))]
    table = summarise(results)
    mean, spread, values, tokens = table[8]["overall"][4]
    assert mean == pytest.approx(0.6) and spread == pytest.approx(0.1) and values == [0.5, 0.7] and tokens == 40
    assert table[8]["video_first"][4][0] == pytest.approx(0.3)
    assert table[8]["video_direction"][4][0] != table[8]["video_direction"][4][0]  # no such question: nan
    pairs = budget_pairs(table)  # 8 frames at M against 2 frames at 4M: +40 points each
    assert "| 8 x M=4 | 40 | 60.0 ± 10.0 | 2 x M=16 | 34 | 20.0 ± 0.0 | +40.0 |" in pairs
    assert "| 8 x M=16 | 136 | 60.0 ± 10.0 | 2 x M=64 | 130 | 20.0 ± 0.0 | +40.0 |" in pairs
    assert pairs.count("\n") == 4  # the header, its rule and those two rows


@pytest.mark.timeout(1200)
def test_quick_study_trains_evaluates_and_writes_its_report(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.video_study", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["seeds"] == [0] and report["steps"] == {"1": 2, "2": 4}
    assert {(r["num_frames"], r["num_frame_tokens"]) for r in report["runs"]} == {
        (frames, m) for frames in EVAL_FRAMES for m in EVAL_FRAME_COUNTS}
    assert all(r["vision_tokens_per_clip"] == r["num_frames"] * (r["num_frame_tokens"] + 1) for r in report["runs"])
    markdown = (tmp_path / "results.md").read_text()
    assert "**video_direction** accuracy" in markdown and "A --quick run" in markdown
    assert "**The same budget**" in markdown
    assert (tmp_path / "accuracy_vs_frames.png").stat().st_size > 10_000
