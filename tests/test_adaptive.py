"""Adaptive N (pipeline/eval/adaptive.py, tools.evaluate --tokens adaptive): answer probabilities, the
policy run on a model (one tower forward per image, the first confident count), calibration and
the oracle on given answers, and the command end to end."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from bench import adaptive as bench_adaptive
from bench.adaptive import verdict
from pipeline.data import iter_samples
from pipeline.eval import adaptive_study
from pipeline.eval.adaptive import adaptive_generate, first_confident
from pipeline.eval.adaptive_study import (
    calibrate,
    evaluate_adaptive,
    evaluate_adaptive_model,
    ladder_arrays,
    oracle_result,
    simulate,
)
from pipeline.eval.heldout import evaluate_model
from pipeline.model.vlm import TokenFlexVLM
from tests.conftest import save_chatty_copy
from tools import evaluate as evaluate_tool

pytestmark = pytest.mark.timeout(600)
LADDER = (16, 64, 256)


@pytest.fixture(scope="module")
def chatty(stage1_run, tmp_path_factory):
    """The shared stage-1 run's final weights made to answer visibly (conftest.save_chatty_copy)."""
    return save_chatty_copy(stage1_run / "final", tmp_path_factory.mktemp("adaptive") / "chatty")


@pytest.fixture(scope="module")
def model(chatty):
    return TokenFlexVLM.from_pretrained(chatty).eval()


@pytest.fixture(scope="module")
def samples(model, synthetic_shards):
    return list(itertools.islice(iter_samples(synthetic_shards, model.tokenizer, model.image_processor), 24))


def shard_subset(shards, names, folder):
    """A shard folder of some of shards' shards (linked), its manifest listing only them."""
    folder.mkdir(parents=True)
    manifest = json.loads((shards / "manifest.json").read_text())
    for name in names:
        (folder / name).symlink_to(shards / name)
    (folder / "manifest.json").write_text(json.dumps({"shards": [s for s in manifest["shards"] if s["name"] in names]}))
    return folder


@pytest.fixture(scope="module")
def splits(synthetic_shards, tmp_path_factory):
    """A validation and a test split with no shard, so no record, in common: the fixture shards'
    first three and last three."""
    root = tmp_path_factory.mktemp("splits")
    names = sorted(p.name for p in synthetic_shards.glob("shard-*.tar"))
    return (shard_subset(synthetic_shards, names[:3], root / "validation"),
            shard_subset(synthetic_shards, names[3:], root / "test"))


def first_keys(model, shards, limit):
    return [s["key"] for s in itertools.islice(iter_samples(shards, model.tokenizer, model.image_processor), limit)]


def watch_calibration(monkeypatch):
    """The keys of the questions each calibration is given (pipeline.eval.adaptive.calibrate, run as it is)."""
    calibrated_on = []
    real_calibrate = adaptive_study.calibrate

    def watched_calibrate(fixed_results, ladder, max_drop):
        calibrated_on.append([p["key"] for p in fixed_results[0]["predictions"]])
        return real_calibrate(fixed_results, ladder, max_drop)

    monkeypatch.setattr(adaptive_study, "calibrate", watched_calibrate)
    return calibrated_on


def check_split_use(report, name, model, splits, limit, ladder, max_drop, max_new_tokens, calibrated_on):
    """Every calibration saw the validation split's first `limit` questions and every report row
    the test split's; the named model's threshold is the one calibrated on validation's answers
    (computed here afresh), which is not the one the test split's answers would give."""
    validation_keys, test_keys = first_keys(model, splits[0], limit), first_keys(model, splits[1], limit)
    assert len(validation_keys) == len(test_keys) == limit and not set(validation_keys) & set(test_keys)
    assert calibrated_on and all(keys == validation_keys for keys in calibrated_on)
    assert all([p["key"] for p in r["predictions"]] == test_keys for r in report["results"])
    rows = [r for r in report["results"] if r["model"] == name]
    samples = itertools.islice(iter_samples(splits[0], model.tokenizer, model.image_processor), limit)
    on_validation = calibrate(evaluate_model(model, samples, list(ladder), 8, max_new_tokens), ladder, max_drop)
    on_test = calibrate([r for r in rows if r["policy"] == "fixed"], ladder, max_drop)
    assert report["calibration"][name]["threshold"] == pytest.approx(on_validation["threshold"], rel=1e-6, abs=0)
    # the splits are told apart (abs=0: the barely trained models' probabilities are as small as 1e-40)
    assert on_test["threshold"] != pytest.approx(on_validation["threshold"], rel=1e-6, abs=0)
    adaptive, = (r for r in rows if r["policy"] == "adaptive")
    assert adaptive["threshold"] == report["calibration"][name]["threshold"]


def test_answer_probability_is_the_product_of_its_greedy_tokens_probabilities(model, samples):
    """scored_generate's probability against a plain greedy loop over the LM, one prompt at a time
    without a cache; the batch (left-padded) gives the same answers and probabilities. The tiny
    model's answers are six unlikely tokens (probabilities near 1e-15), so they are compared as
    logarithms: compared as probabilities, pytest.approx's absolute tolerance would pass any two."""
    batch = [s for s in samples if s["pixel_values"] is not None][:3]
    answers, _, probabilities = model.scored_generate(
        lambda: model.prompt_embeddings([s["prompt_ids"] for s in batch], model.image_inputs(batch), 16), 6)
    end = set(model.generation_config().eos_token_id)
    for sample, answer, probability in zip(batch, answers, probabilities):
        embeds, _ = model.prompt_embeddings([sample["prompt_ids"]], model.image_inputs([sample]), 16)
        tokens, log_probability = [], 0.0
        with torch.no_grad():
            for _ in range(6):
                logits = model.language_model(inputs_embeds=embeds, use_cache=False).logits[0, -1].float()
                token = int(logits.argmax())
                log_probability += float(logits.log_softmax(-1)[token])
                tokens.append(token)
                if token in end:
                    break
                embeds = torch.cat([embeds, model.language_model.get_input_embeddings()(torch.tensor([[token]]))], 1)
        assert answer == model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert math.log(probability) == pytest.approx(log_probability, abs=1e-3)
    logs = sorted(math.log(p) for p in probabilities)
    assert logs[-1] - logs[0] > 0.1  # the check above tells these answers' probabilities apart


def test_answer_probability_stops_at_the_first_end_token(model):
    """What generation pads after an answer's end token counts nothing; the end token counts."""
    end = model.generation_config().eos_token_id[0]
    word, pad = end - 1, model.tokenizer.pad_token_id  # word: any token other than the end
    logits = torch.randn(2, 4, model.language_model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    sequences = torch.tensor([[word, end, pad, pad], [word, word, word, word]])
    log_probs = logits.log_softmax(-1).gather(-1, sequences[..., None])[..., 0]
    output = GenerateDecoderOnlyOutput(sequences=sequences, logits=tuple(logits.unbind(1)))
    assert np.log(model.answer_probabilities(output)) == pytest.approx(
        [float(log_probs[0, :2].sum()), float(log_probs[1].sum())], abs=1e-4)


def test_policy_encodes_each_image_once_and_stops_at_the_first_confident_count(model, samples):
    fixed = evaluate_model(model, samples, list(LADDER), batch_size=8, max_new_tokens=8)
    arrays = ladder_arrays(fixed, LADDER)
    first = np.sort(arrays["probabilities"][arrays["image"], 0])
    threshold = float((first[len(first) // 2 - 1] + first[len(first) // 2]) / 2)  # half the images stop at 16

    tower_calls = []
    hook = model.vision_tower.register_forward_hook(  # the tower is called with pixel_values by keyword
        lambda module, args, kwargs, output: tower_calls.append(
            len(kwargs.get("pixel_values", args[0] if args else []))
        ),
        with_kwargs=True,
    )
    try:
        results = []
        for batch in (samples[:8], samples[8:16], samples[16:]):
            batch_results, seconds = adaptive_generate(model, batch, LADDER, threshold, 8)
            results += batch_results
            assert seconds > 0
    finally:
        hook.remove()
    images = [s["pixel_values"] is not None for s in samples]
    assert tower_calls == [sum(images[:8]), sum(images[8:16]), sum(images[16:])]  # once per batch, whatever the tries

    expected = first_confident(arrays["probabilities"].copy(), threshold)
    chosen = [r["chosen_tokens"] for r, image in zip(results, images) if image]
    assert chosen == [LADDER[i] for i in expected[arrays["image"]]]
    assert {16, 64}.issubset(chosen) or {16, 256}.issubset(chosen)  # both stops and tries happened
    by_n = {r["num_vision_tokens"]: r["predictions"] for r in fixed}
    for i, r in enumerate(results):
        if r["chosen_tokens"] is None:  # text-only: answered once
            assert not images[i] and r["tries"] == 1
        else:
            assert r["tries"] == LADDER.index(r["chosen_tokens"]) + 1
            assert r["prediction"] == by_n[r["chosen_tokens"]][i]["prediction"]
    assert simulate(arrays, LADDER, threshold)["mean_vision_tokens"] == pytest.approx(np.mean(chosen))


def test_thresholds_zero_and_infinite_give_the_smallest_and_the_largest_count(model, samples):
    for threshold, count in ((0.0, LADDER[0]), (math.inf, LADDER[-1])):
        result = evaluate_adaptive_model(model, samples[:10], LADDER, threshold, batch_size=5, max_new_tokens=4)
        assert result["mean_vision_tokens"] == count
        assert result["tries_per_image"] == LADDER.index(count) + 1
        assert result["prefill_total_s"] > 0 and result["samples"] == 10


def fixed_rows(table):
    """pipeline.eval.heldout-style results from {N: [(probability, right), ...]}: question i is an
    image question of type coarse, except the last, a text one."""
    rows = []
    for n, answers in table.items():
        predictions = [{"key": f"k{i}", "answer": "yes", "question_type": "text" if i == len(answers) - 1 else "coarse",
                        "image": i != len(answers) - 1, "prediction": "yes" if right else "no", "probability": p}
                       for i, (p, right) in enumerate(answers)]
        rows.append({"num_vision_tokens": n, "predictions": predictions})
    return rows


# four image questions and a text one; N=16 gets questions 0 and 1 right, N=64 gets 0-2, N=256 all but 3
TABLE = {16: [(0.9, True), (0.5, True), (0.4, False), (0.3, False), (0.8, True)],
         64: [(0.95, True), (0.6, True), (0.7, True), (0.5, False), (0.8, True)],
         256: [(0.9, True), (0.9, True), (0.9, True), (0.6, False), (0.8, True)]}


def test_calibration_takes_the_fewest_tokens_within_the_allowed_drop():
    rows = fixed_rows(TABLE)
    # best fixed: 64 and 256 both answer 4 of 5; the smaller wins the tie
    exact = calibrate(rows, LADDER, max_drop=0.0)
    assert exact["best_fixed_tokens"] == 64 and exact["best_fixed_accuracy"] == pytest.approx(0.8)
    # threshold 0.5: questions 0 and 1 stop at 16, 2 and 3 at 64 (0.4, 0.3 < 0.5) -> 0, 1, 2 and the text right
    assert exact["threshold"] == pytest.approx(0.5) and exact["accuracy"] == pytest.approx(0.8)
    assert exact["mean_vision_tokens"] == pytest.approx((16 + 16 + 64 + 64) / 4)
    # a drop of 20 points allows the lowest threshold: every image question at 16, as accurate as fixed 16
    loose = calibrate(rows, LADDER, max_drop=0.2)
    assert loose["threshold"] == pytest.approx(0.3) and loose["mean_vision_tokens"] == 16
    assert loose["accuracy"] == pytest.approx(0.6)


def test_oracle_takes_the_smallest_count_that_answers_right():
    oracle = oracle_result(fixed_rows(TABLE), LADDER, "m")
    assert [p["chosen_tokens"] for p in oracle["predictions"]] == [16, 16, 64, 16, None]  # none right: 16
    assert oracle["accuracy"] == pytest.approx(0.8) and oracle["mean_vision_tokens"] == pytest.approx(28)


def test_evaluate_tokens_adaptive_reports_fixed_policy_and_oracle_per_model(chatty, stage1_run, model, splits,
                                                                            tmp_path, monkeypatch):
    """Per model: the fixed rows, the policy and the oracle on the test split, the threshold
    calibrated on the validation split only (check_split_use)."""
    calibrated_on = watch_calibration(monkeypatch)
    out = tmp_path / "out"
    assert evaluate_tool.main([str(chatty), str(stage1_run / "final"), "--names", "chatty,final",
                               "--shards", str(splits[1]), "--tokens", "adaptive", "--ladder", "16,64,256",
                               "--calibrate", str(splits[0]), "--max-drop", "2", "--limit", "16",
                               "--max-new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert len(calibrated_on) == 2  # once per model
    check_split_use(report, "chatty", model, splits, 16, LADDER, 0.02, 4, calibrated_on)
    assert [(r["model"], r["policy"], r["num_vision_tokens"]) for r in report["results"]] == [
        (m, *p) for m in ("chatty", "final")
        for p in (("fixed", 16), ("fixed", 64), ("fixed", 256), ("adaptive", "adaptive"), ("oracle", "oracle"))]
    for name in ("chatty", "final"):
        rows = {r["policy"] if r["policy"] != "fixed" else r["num_vision_tokens"]: r
                for r in report["results"] if r["model"] == name}
        assert rows["oracle"]["accuracy"] >= max(rows[n]["accuracy"] for n in LADDER)
        assert 16 <= rows["adaptive"]["mean_vision_tokens"] <= 256
        assert rows["adaptive"]["threshold"] == report["calibration"][name]["threshold"]
        assert rows["adaptive"]["prefill_total_s"] > 0 and set(rows["adaptive"]["mean_vision_tokens_by_type"]) <= {
            "coarse", "medium", "fine"}
    markdown = (out / "results.md").read_text()
    assert "| chatty | adaptive |" in markdown and "| final | oracle |" in markdown and "tries per image" in markdown
    assert (out / "accuracy_vs_mean_tokens.png").stat().st_size > 10_000


def test_evaluate_tokens_adaptive_needs_one_threshold_source(synthetic_shards, stage1_run, tmp_path, capsys):
    for extra in ([], ["--threshold", "0.5", "--calibrate", str(synthetic_shards)]):
        with pytest.raises(SystemExit):
            evaluate_tool.main([str(stage1_run / "final"), "--shards", str(synthetic_shards), "--tokens", "adaptive",
                                "--out", str(tmp_path), *extra])
        assert "--threshold or --calibrate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_tool.main([str(stage1_run / "final"), "--shards", str(synthetic_shards), "--tokens", "adaptive",
                            "--ladder", "64,16", "--threshold", "0.5", "--out", str(tmp_path)])
    assert "increasing" in capsys.readouterr().err


@pytest.mark.parametrize("threshold, calibration, got", [(None, None, "neither"), (0.5, "shards", "both")])
def test_evaluate_adaptive_takes_exactly_one_threshold_source(threshold, calibration, got):
    with pytest.raises(ValueError, match=f"exactly one of them, got {got}"):
        evaluate_adaptive(["no model read"], "shards", threshold=threshold, calibration_shards=calibration)


def test_bench_verdict_needs_both_the_accuracy_and_the_tokens():
    def report(adaptive_accuracy, adaptive_tokens):
        rows = [{"model": "m", "policy": "fixed", "num_vision_tokens": n, "accuracy": a, "mean_vision_tokens": n}
                for n, a in ((16, 0.70), (64, 0.80), (144, 0.80))]  # best: 64, the smaller of the two at 0.80
        return {"results": rows + [{"model": "m", "policy": "adaptive", "accuracy": adaptive_accuracy,
                                    "mean_vision_tokens": adaptive_tokens}]}

    assert "Goal reached**: adaptive N is -1.0 points from the best fixed N (N=64) at 60%" in verdict(
        report(0.79, 38.4), "m")
    assert "Goal NOT reached**: adaptive N is -1.5 points" in verdict(report(0.785, 30), "m")
    assert "Goal NOT reached**: adaptive N is +0.0 points from the best fixed N (N=64) at 61%" in verdict(
        report(0.80, 39), "m")


def test_bench_adaptive_writes_its_command_and_verdict(chatty, model, splits, tmp_path, monkeypatch):
    """bench.adaptive on a tools.demo-shaped folder (the chatty model, validation and test splits
    with no record in common), a few records: the threshold is calibrated on the demo's validation
    split only and the figures are on its test split (check_split_use); the results name the
    command, the commit and the verdict."""
    calibrated_on = watch_calibration(monkeypatch)
    demo = tmp_path / "demo"
    (demo / "shards").mkdir(parents=True)
    (demo / "model").symlink_to(chatty)
    for split, folder in zip(("validation", "test"), splits):
        (demo / "shards" / split).symlink_to(folder)
    out = tmp_path / "out"
    assert bench_adaptive.main(["--demo", str(demo), "--out", str(out), "--ladder", "16,64", "--limit", "8"]) == 0
    assert len(calibrated_on) == 1
    check_split_use(json.loads((out / "results.json").read_text()), "demo", model, splits, 8, (16, 64), 0.005, 16,
                    calibrated_on)
    markdown = (out / "results.md").read_text()
    assert f"Command: `python -m bench.adaptive --demo {demo} --out {out} --ladder 16,64 --limit 8`" in markdown
    assert "at commit " in markdown and "Goal " in markdown and "| demo | adaptive |" in markdown
    assert "8 records" in markdown and (out / "accuracy_vs_mean_tokens.png").exists()
