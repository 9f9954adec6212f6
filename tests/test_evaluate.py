"""tools/generate and tools/evaluate on folders converted from the shared 2-rank stage-1 run."""

import itertools
import json
import math

import pytest
import torch
from PIL import Image

from pipeline.data import iter_samples
from pipeline.eval.heldout import evaluate_model, last_reply_labels, normalise, score
from pipeline.export.convert import convert_checkpoint
from pipeline.model.chat import IGNORE_INDEX
from pipeline.model.vlm import TokenFlexVLM
from tests.conftest import save_chatty_copy
from tools import benchmark as benchmark_tool
from tools import evaluate as evaluate_tool
from tools import generate as generate_tool

pytestmark = pytest.mark.timeout(600)
TYPES = {"coarse", "medium", "fine", "text"}


@pytest.fixture(scope="module")
def models(stage1_run, tmp_path_factory):
    """{name: folder}: the run's exported final weights, its earlier step-12 checkpoint, and
    "chatty": the final weights made to answer visibly (conftest.save_chatty_copy)."""
    root = tmp_path_factory.mktemp("models")
    convert_checkpoint(stage1_run / "checkpoints", root / "early", tag="step-000012")
    save_chatty_copy(stage1_run / "final", root / "chatty")
    return {"final": stage1_run / "final", "early": root / "early", "chatty": root / "chatty"}


@pytest.fixture(scope="module")
def final_model(models):
    return TokenFlexVLM.from_pretrained(models["final"]).eval()


@pytest.fixture(scope="module")
def chatty_model(models):
    return TokenFlexVLM.from_pretrained(models["chatty"]).eval()


def read_samples(shards, model, count):
    return list(itertools.islice(iter_samples(shards, model.tokenizer, model.image_processor), count))


@pytest.fixture(scope="module")
def image_file(synthetic_shards):
    return sorted((synthetic_shards.parent / "raw" / "images").glob("*.png"))[0]


# ---- generate ----

def test_generate_prints_a_table_of_answers_at_each_n(models, chatty_model, image_file, capsys):
    prompt = "What colour is the background?"
    assert generate_tool.main([str(models["chatty"]), "--image", str(image_file), "--prompt", prompt,
                               "--tokens", "16,64,256", "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["N", "prefill", "ms", "answer"]
    rows = [line.split(maxsplit=2) for line in lines[1:]]
    assert [int(r[0]) for r in rows] == [16, 64, 256]
    assert all(float(r[1]) > 0 for r in rows)
    with Image.open(image_file) as image:
        expected = [chatty_model.generate([image.convert("RGB")], [prompt], n, 8)[0] for n in (16, 64, 256)]
    assert all(expected) and [r[2] for r in rows] == expected


def test_generate_one_n_text_only_prints_just_the_answer(models, chatty_model, capsys):
    prompt = "What is 2 plus 3?"
    assert generate_tool.main([str(models["chatty"]), "--prompt", prompt, "--tokens", "36"]) == 0
    expected = chatty_model.generate([None], [prompt], 36)[0]
    assert expected and capsys.readouterr().out == expected + "\n"


def test_generate_in_bf16_on_cpu(models, capsys):
    prompt = "What is 2 plus 3?"
    assert generate_tool.main([str(models["chatty"]), "--prompt", prompt, "--tokens", "36", "--device", "cpu",
                               "--dtype", "bf16"]) == 0
    output = capsys.readouterr()
    assert f"{models['chatty']} on cpu in bfloat16" in output.err
    bf16 = TokenFlexVLM.from_pretrained(models["chatty"], "cpu", "bf16").eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    expected = bf16.generate([None], [prompt], 36)[0]
    assert expected and output.out == expected + "\n"


@pytest.mark.parametrize("option, message", [(["--device", "cuda:99"], "--device: device cuda:99: torch"),
                                             (["--device", "gpu"], "--device: device 'gpu'"),
                                             (["--dtype", "half"], "argument --dtype: invalid choice: 'half'")])
def test_generate_rejects_a_device_or_dtype_it_cannot_use(models, option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_tool.main([str(models["final"]), "--prompt", "hi", *option])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "tokens, message",
    [
        ("20", "num_vision_tokens=20 is not a perfect square"),
        ("16,1024", "num_vision_tokens=1024 asks for a 32x32 grid, larger than the encoder's 16x16 patches"),
        ("a,b", "comma-separated integers"),
    ],
)
def test_generate_rejects_bad_token_counts(models, tokens, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_tool.main([str(models["final"]), "--prompt", "hi", "--tokens", tokens])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---- scoring and batches ----

def test_normalise_and_score_per_question_type():
    assert normalise("  Red.\n") == "red" and normalise("8!") == "8" and normalise("A") == "a"
    samples = [{"answer": a, "question_type": t}
               for a, t in [("red", "coarse"), ("3", "medium"), ("K", "fine"), ("7", "fine")]]
    result = score(samples, [" Red.", "4", "k", "7?"])
    assert result["accuracy"] == 0.75
    assert result["accuracy_by_type"] == {"coarse": 1.0, "fine": 1.0, "medium": 0.0}
    assert result["samples_by_type"] == {"coarse": 1, "fine": 2, "medium": 1}


def test_multi_turn_records_score_only_their_last_reply(final_model, synthetic_shards):
    samples = read_samples(synthetic_shards, final_model, 60)
    sample = next(s for s in samples if len(s["record"]["conversations"]) > 2)
    first_answer, last_answer = (sample["record"]["conversations"][i]["value"] for i in (1, -1))
    tokenizer = final_model.tokenizer
    labels = last_reply_labels(sample)
    scored = [t for t, label in zip(sample["input_ids"], labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(scored) == last_answer + "<|im_end|>"
    # the prompt holds the earlier turns, the reply to score is not in it
    assert first_answer in tokenizer.decode(sample["prompt_ids"])
    assert len(sample["prompt_ids"]) + len(scored) == len(sample["input_ids"]) - 1  # the template's closing newline

    batch = final_model.labelled_batch([dict(sample, labels=labels), samples[0]], 64)
    slots = (batch["input_ids"] == final_model.config.image_token_id).sum(dim=1)
    assert slots[0] == 64 and batch["image_mask"].sum() == 1 + (samples[0]["pixel_values"] is not None)


def test_loss_does_not_depend_on_batch_size(final_model, synthetic_shards):
    samples = read_samples(synthetic_shards, final_model, 10)
    one, = evaluate_model(final_model, samples, [16], batch_size=1, max_new_tokens=2)
    five, = evaluate_model(final_model, samples, [16], batch_size=5, max_new_tokens=2)
    assert math.isclose(one["loss"], five["loss"], rel_tol=1e-5)
    assert one["samples"] == five["samples"] == 10


# ---- evaluate ----

@pytest.fixture(scope="module")
def evaluation(models, synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    assert evaluate_tool.main([str(models["final"]), str(models["early"]), str(models["chatty"]),
                               "--names", "flex,early,chatty",
                               "--shards", str(synthetic_shards), "--tokens", "16,64", "--limit", "12",
                               "--batch-size", "4", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_evaluate_results_cover_every_model_and_n(evaluation):
    _, report = evaluation
    results = report["results"]
    assert [(r["model"], r["num_vision_tokens"]) for r in results] == [
        (name, n) for name in ("flex", "early", "chatty") for n in (16, 64)]
    for r in results:
        assert r["samples"] == 12 == sum(r["samples_by_type"].values())
        assert set(r["accuracy_by_type"]) <= TYPES
        hits = [normalise(p["prediction"]) == normalise(p["answer"]) for p in r["predictions"]]
        assert r["accuracy"] == sum(hits) / 12
        assert r["loss"] > 0 and r["prefill_ms"] > 0 and r["vision_tokens_per_s"] > 0
        assert (r["device"], r["dtype"]) == ("cpu", "float32")  # this machine's default
    # different models, really evaluated: their own losses and answers
    assert len({r["loss"] for r in results}) == len(results)
    assert all(p["prediction"] for p in results[-1]["predictions"])


def test_evaluate_markdown_table_has_the_json_numbers(evaluation):
    out, report = evaluation
    lines = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    assert len(rows) == len(report["results"]) == 6
    for row, r in zip(rows, report["results"]):
        assert (row["model"], int(row["N"])) == (r["model"], r["num_vision_tokens"])
        assert float(row["accuracy"]) == round(r["accuracy"], 3)
        for t, accuracy in r["accuracy_by_type"].items():
            assert float(row[f"{t} (n={r['samples_by_type'][t]})"]) == round(accuracy, 3)
        assert float(row["loss"]) == round(r["loss"], 4)
        assert float(row["prefill ms"]) == round(r["prefill_ms"], 2)
        assert row["prefill q1–q3"] == f"{r['prefill_ms_q1']:.2f}–{r['prefill_ms_q3']:.2f}"
        assert r["prefill_ms_q1"] <= r["prefill_ms"] <= r["prefill_ms_q3"]


def test_evaluate_plot_is_a_png(evaluation):
    out, _ = evaluation
    path = out / "accuracy_vs_tokens.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100


def test_evaluate_in_bf16_on_cpu_matches_fp32_to_bf16_precision(models, synthetic_shards, evaluation, tmp_path):
    assert evaluate_tool.main([str(models["final"]), "--names", "flex", "--shards", str(synthetic_shards),
                               "--tokens", "16,64", "--limit", "12", "--batch-size", "4", "--dtype", "bf16",
                               "--out", str(tmp_path)]) == 0
    bf16 = json.loads((tmp_path / "results.json").read_text())["results"]
    fp32 = [r for r in evaluation[1]["results"] if r["model"] == "flex"]
    assert "on cpu in bfloat16" in (tmp_path / "results.md").read_text()
    for low, full in zip(bf16, fp32, strict=True):
        assert (low["dtype"], low["num_vision_tokens"], low["samples"]) == ("bfloat16", full["num_vision_tokens"], 12)
        assert low["loss"] != full["loss"] and math.isclose(low["loss"], full["loss"], rel_tol=2e-2)


def test_evaluate_rejects_a_token_count_beyond_the_grid(models, synthetic_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_tool.main([str(models["final"]), "--shards", str(synthetic_shards), "--tokens", "16,400",
                            "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert (
        "num_vision_tokens=400 asks for a 20x20 grid, larger than the encoder's 16x16 patches"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("tool, option", [(evaluate_tool, "--shards"), (benchmark_tool, "--tasks")])
def test_model_tools_reject_more_names_than_folders(tool, option, models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(models["final"]), "--names", "flex,fixed", option, str(tmp_path), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "2 names (--names) for 1 model folders" in capsys.readouterr().err
