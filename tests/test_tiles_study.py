"""bench/tiles_study: its summary over seeds, and its --quick run end to end."""

import json
import subprocess
import sys

import pytest

from bench.tiles_study import EVAL_COUNTS, EVAL_TILES, MODELS, summarise
from tests.distributed import REPO


def test_summary_is_mean_and_half_range_over_seeds_per_model_and_tile_limit():
    results = [{"study_model": "tiles4", "seed": seed, "num_tiles": 4, "num_vision_tokens": 16, "accuracy": acc,
                "vision_tokens_per_image": 50.0, "accuracy_by_type": {"wide_fine": acc / 2}}
               for seed, acc in [(0, 0.5), (1, 0.7), (2, 0.9)]]
    table = summarise(results, [0, 1])
    mean, spread, values, tokens = table["tiles4", 4]["overall"][16]
    assert mean == pytest.approx(0.6) and spread == pytest.approx(0.1) and values == [0.5, 0.7] and tokens == 50.0
    assert table["tiles4", 4]["wide_fine"][16][0] == pytest.approx(0.3)


@pytest.mark.timeout(1200)
def test_quick_study_trains_evaluates_and_writes_its_report(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.tiles_study", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert {(r["study_model"], r["num_tiles"], r["num_vision_tokens"]) for r in report["runs"]} == {
        (model, tiles, n) for model in MODELS for tiles in EVAL_TILES for n in EVAL_COUNTS}
    tokens = {(r["study_model"], r["num_tiles"], r["num_vision_tokens"]): r["vision_tokens_per_image"]
              for r in report["runs"]}
    assert tokens["tiles1", 1, 16] == 16 and tokens["tiles1", 4, 16] > 16  # a tile limit of 4 at evaluation
    markdown = (tmp_path / "results.md").read_text()
    assert "**wide_fine** accuracy" in markdown and "A --quick run" in markdown
    assert (tmp_path / "accuracy_vs_tiles.png").stat().st_size > 10_000
