"""bench/flex_vs_fixed: the study's verdicts from given accuracies, and its --quick run end to end."""

import json
import subprocess
import sys

import pytest

from bench.flex_vs_fixed import EVAL_COUNTS, answers, scaled_steps, summarise
from tests.distributed import REPO


def runs(model, seed, overall):
    """Result rows as the study stores them: accuracy overall and for one question type."""
    return [{"study_model": model, "seed": seed, "num_vision_tokens": n, "accuracy": overall(n),
             "accuracy_by_type": {"coarse": overall(n)}} for n in EVAL_COUNTS]


def test_summary_is_mean_and_half_range_over_seeds():
    results = runs("flex", 0, lambda n: 0.50) + runs("flex", 1, lambda n: 0.60) + runs("flex", 2, lambda n: 0.58)
    mean, spread, values = summarise(results, ["flex"], [0, 1])["flex"]["overall"][64]
    assert mean == pytest.approx(0.55) and spread == pytest.approx(0.05) and values == [0.50, 0.60]


def test_answers_compare_flex_with_each_specialist_at_and_away_from_its_count():
    results = (runs("flex", 0, lambda n: 0.600)
               + runs("fixed16", 0, lambda n: 0.605 if n == 16 else 0.50)  # flex 0.5 points behind at 16
               + runs("fixed64", 0, lambda n: 0.620 if n == 64 else 0.70))  # 2 behind at 64, ahead nowhere
    text = answers(summarise(results, ["flex", "fixed16", "fixed64"], [0]))
    assert "fixed16 at N=16: -0.5 (within 1 point" in text
    assert "fixed64 at N=64: -2.0 (NOT within 1 point" in text
    assert "fixed16: flex ahead at 6 of 6 counts" in text and "36*: +10.0" in text
    assert "fixed64: flex ahead at 0 of 6 counts" in text
    assert "Pooling" not in text  # no flex-resize model in this run


def test_specialists_run_the_steps_that_see_the_flex_models_samples():
    per_n = {16: 30.0, 64: 15.0, 144: 7.5}  # samples one step packs at each N
    flex_samples = 600 * (30 + 15 + 7.5) / 3
    assert scaled_steps(600, per_n, {16: 1}) * 30 == pytest.approx(flex_samples, rel=0.01)
    assert scaled_steps(600, per_n, {144: 1}) == 1400
    assert scaled_steps(600, per_n, {16: 1, 64: 1, 144: 1}) == 600


def test_quick_study_trains_evaluates_and_writes_its_report(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.flex_vs_fixed", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert {(r["study_model"], r["seed"], r["num_vision_tokens"]) for r in report["runs"]} == {
        (model, 0, n) for model in ("flex", "fixed16") for n in EVAL_COUNTS}
    settings = report["settings"]
    per_n = {int(n): v for n, v in settings["samples_per_step"].items()}
    assert per_n[16] > per_n[64] > per_n[144]  # fewer slots per image: more samples per packed step
    assert settings["steps"]["fixed16"]["2"] < settings["steps"]["flex"]["2"]
    markdown = (tmp_path / "results.md").read_text()
    assert "fixed16 at N=16:" in markdown and "fixed16: flex ahead at" in markdown
    assert all(f"N={n}" in markdown for n in EVAL_COUNTS)
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 10_000
