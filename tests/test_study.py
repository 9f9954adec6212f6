"""bench/flex_vs_fixed: the study's verdicts from given accuracies, its step matching, and its
--quick run end to end."""

import json
import subprocess
import sys

import pytest

from bench.flex_vs_fixed import EVAL_COUNTS, MODELS, STUDIES, answers, scaled_steps, summarise
from tests.distributed import REPO


def runs(model, seed, overall):
    """Result rows as the study stores them: accuracy overall and for one question type."""
    return [{"study_model": model, "seed": seed, "num_vision_tokens": n, "accuracy": overall(n),
             "accuracy_by_type": {"coarse": overall(n)}} for n in EVAL_COUNTS]


def test_summary_is_mean_and_standard_deviation_over_the_chosen_seeds():
    results = (runs("flex", 0, lambda n: 0.50) + runs("flex", 1, lambda n: 0.60) + runs("flex", 2, lambda n: 0.58)
               + runs("flex", 3, lambda n: 0.0))
    mean, sd, values = summarise(results, ["flex"], [0, 1, 2])["flex"]["overall"][64]
    assert mean == pytest.approx(0.56) and sd == pytest.approx(0.052915, rel=1e-4) and values == [0.50, 0.60, 0.58]


def test_within_one_point_is_two_sided_and_not_worse_is_its_own_verdict():
    results = (runs("flex", 0, lambda n: 0.600)
               + runs("fixed16", 0, lambda n: 0.605 if n == 16 else 0.50)  # flex 0.5 points behind at 16
               + runs("fixed64", 0, lambda n: 0.620 if n == 64 else 0.70)  # 2 behind at 64, ahead nowhere
               + runs("fixed144", 0, lambda n: 0.560 if n == 144 else 0.70))  # 4 ahead at 144
    text = answers(summarise(results, ["flex", "fixed16", "fixed64", "fixed144"], [0]), STUDIES["main"])
    assert "fixed16 at N=16: -0.5 (within 1 point; not worse by more than 1 point" in text
    assert "fixed64 at N=64: -2.0 (NOT within 1 point; worse by more than 1 point" in text
    assert "fixed144 at N=144: +4.0 (NOT within 1 point; not worse by more than 1 point" in text
    assert "fixed16: flex ahead at 6 of 6 counts" in text and "36*: +10.0" in text
    assert "fixed64: flex ahead at 0 of 6 counts" in text


def test_an_ablation_reports_the_variant_against_flex_at_every_count():
    results = runs("flex", 0, lambda n: 0.60) + runs("flex-235", 0, lambda n: 0.625 if n == 144 else 0.595)
    text = answers(summarise(results, ["flex", "flex-235"], [0]), STUDIES["weights"])
    assert "**flex-235 minus flex**" in text
    assert "144: +2.5 (NOT within 1 point)" in text and "16: -0.5 (within 1 point)" in text


def test_steps_match_the_flex_models_samples_or_its_compute():
    per_n = {16: {"samples": 30.0, "flops": 2.0}, 64: {"samples": 15.0, "flops": 3.0},
             144: {"samples": 7.5, "flops": 4.0}}  # one step's samples and useful FLOPs at each N
    flex_samples = 600 * (30 + 15 + 7.5) / 3
    assert scaled_steps(600, per_n, MODELS["fixed16"]) * 30 == pytest.approx(flex_samples, rel=0.01)
    assert scaled_steps(600, per_n, MODELS["fixed144"]) == 1400
    assert scaled_steps(600, per_n, MODELS["flex"]) == 600
    assert scaled_steps(600, per_n, MODELS["fixed16-compute"]) == 900  # 600 x 3 FLOPs / 2
    assert scaled_steps(600, per_n, MODELS["fixed144-compute"]) == 450
    # 2:3:5 draws more of the costly 144 steps: fewer steps for the same samples
    assert scaled_steps(600, per_n, MODELS["flex-235"]) == round(600 * 17.5 / 14.25)


def test_quick_study_trains_evaluates_on_the_test_split_and_reuses_its_models(tmp_path):
    command = [sys.executable, "-m", "bench.flex_vs_fixed", "--quick", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "main" / "results.json").read_text())
    assert {(r["study_model"], r["seed"], r["num_vision_tokens"]) for r in report["runs"]} == {
        (model, 0, n) for model in ("flex", "fixed16") for n in EVAL_COUNTS}
    assert all(r["samples"] == 48 for r in report["runs"])  # the test split, whole
    settings = report["settings"]
    per_n = {int(n): v for n, v in settings["per_step"]["stage2"].items()}
    assert per_n[16]["samples"] > per_n[64]["samples"] > per_n[144]["samples"]  # fewer slots: more samples a step
    assert settings["steps"]["fixed16"]["stage2"] < settings["steps"]["flex"]["stage2"]
    assert list(settings["steps"]["flex"]) == ["stage1", "stage2_fine", "stage2"]  # the demo's runs, in order
    assert (tmp_path / "runs" / "fixed16-seed0" / "stage2_fine" / "final").is_dir()
    markdown = (tmp_path / "main" / "results.md").read_text()
    assert "fixed16 at N=16:" in markdown and "fixed16: flex ahead at" in markdown and "48 records" in markdown
    assert all(f"N={n}" in markdown for n in EVAL_COUNTS)
    assert (tmp_path / "main" / "accuracy_vs_tokens.png").stat().st_size > 10_000
    # an ablation in the same folder reuses the trained flex model instead of training it again
    result = subprocess.run(command + ["--studies", "weights"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "flex, seed 0: reusing" in result.stdout and "flex-235, seed 0: stage2," in result.stdout
    assert "**flex-235 minus flex**" in (tmp_path / "weights" / "results.md").read_text()
