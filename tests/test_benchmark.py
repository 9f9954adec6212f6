"""The tokenflex lmms-eval model and tools/benchmark, run by the real lmms-eval on a local task
written from the synthetic held-out shards (nothing is downloaded), against tools/evaluate.

Outside CI these tests skip when lmms-eval is not installed (requirements-eval.txt); in CI
(CI=true) they fail instead.
"""

import io
import json
import os
import shutil
import subprocess

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageFile

from pipeline.data.mixture import resolve_source
from pipeline.evaluate import normalise
from pipeline.model import TokenFlexVLM
from pipeline.model_card import EVALUATION_HEADING
from pipeline.chat import IGNORE_INDEX, IMAGE_TOKEN
from tests.conftest import save_chatty_copy
from tests.distributed import REPO
from tools import benchmark as benchmark_tool
from tools import evaluate as evaluate_tool
from tools.demo import cpu_training_env, torchrun

try:
    import datasets
    import lmms_eval  # noqa: F401
except ModuleNotFoundError as error:
    if os.environ.get("CI"):
        raise
    pytest.skip(f"lmms-eval is not installed ({error}): pip install --no-deps -r requirements-eval.txt",
                allow_module_level=True)

pytestmark = pytest.mark.timeout(900)
TASK = "synthetic_heldout"
CHOICE_TASK = "synthetic_heldout_choice"  # the same questions, the answer against one wrong choice
# lmms-eval's exact_match options in the task YAML that score as pipeline.evaluate.normalise does
EXACT_MATCH_OPTIONS = {"ignore_case": True, "regexes_to_ignore": [r"^\s+", r"[.,;:!?\s]+$"]}
LIMIT = 24  # the first samples of the shards; the task keeps the single-turn ones
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def pil_default_for_truncated_images():
    """Importing lmms-eval's api/task.py sets PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES;
    give the rest of the suite PIL's default back (build_shards rejects truncated images)."""
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = False


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def task_dir(synthetic_shards, tmp_path_factory):
    """An lmms-eval task folder: the single-turn records among the first LIMIT samples of the
    shards as a local dataset (question without its image marker, answer, image or None), a
    generation task scoring them with lmms-eval's exact_match, normalised as pipeline.evaluate
    does (case and trailing punctuation ignored), and a multiple-choice one (log-likelihoods)."""
    folder = tmp_path_factory.mktemp("lmms_task")
    rows = {"key": [], "question": [], "answer": [], "choices": [], "image": []}
    for sample in list(wds.tarfile_to_samples()({"url": url} for url in resolve_source(str(synthetic_shards))[0]))[:LIMIT]:
        record = json.loads(sample["json"])
        if len(record["conversations"]) != 2:
            continue
        rows["key"].append(sample["__key__"])
        rows["question"].append(record["conversations"][0]["value"].removeprefix(f"{IMAGE_TOKEN}\n"))
        rows["answer"].append(record["conversations"][1]["value"])
        rows["choices"].append([rows["answer"][-1], "blue" if rows["answer"][-1] != "blue" else "red"])
        rows["image"].append(Image.open(io.BytesIO(sample["png"])) if "png" in sample else None)
    # text-only and image questions, and a multi-turn record left out
    assert 0 < rows["image"].count(None) < len(rows["key"]) < LIMIT
    text = datasets.Value("string")
    features = datasets.Features({"key": text, "question": text, "answer": text, "choices": datasets.Sequence(text),
                                  "image": datasets.Image()})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(folder / "data")
    (folder / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: {folder / "data"}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: image
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: {json.dumps(EXACT_MATCH_OPTIONS["ignore_case"])}
    regexes_to_ignore: {json.dumps(EXACT_MATCH_OPTIONS["regexes_to_ignore"])}
""")
    (folder / f"{CHOICE_TASK}.yaml").write_text(f"""\
task: {CHOICE_TASK}
dataset_path: {folder / "data"}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: image
doc_to_text: question
doc_to_choice: choices
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder, rows


@pytest.fixture(scope="module")
def models(stage1_run, tmp_path_factory):
    """A copy of the run's final folder (its model answers only newlines, empty once stripped;
    tools.benchmark --model-card writes into its card) and "chatty", the same weights made to
    answer visibly (conftest.save_chatty_copy)."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(stage1_run / "final", root / "final")
    save_chatty_copy(stage1_run / "final", root / "chatty")
    return {"final": root / "final", "chatty": root / "chatty"}


@pytest.fixture(scope="module")
def evaluation(models, synthetic_shards, tmp_path_factory):
    """tools/evaluate's predictions per (model, N), keyed by sample."""
    out = tmp_path_factory.mktemp("evaluation")
    assert evaluate_tool.main([str(models["final"]), str(models["chatty"]), "--names", "final,chatty",
                               "--shards", str(synthetic_shards), "--tokens", "16,64", "--limit", str(LIMIT),
                               "--batch-size", "1", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    return {(r["model"], r["num_vision_tokens"]): {p["key"]: p for p in r["predictions"]} for r in report["results"]}


def test_task_exact_match_options_score_as_pipeline_evaluate():
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    answers = ["red", "3", "K", "7", "cow", "8"]
    predictions = [" Red.", "4", "k", "7?", "Cow!\n", "8 8"]
    for prediction, answer in zip(predictions, answers):
        expected = float(normalise(prediction) == normalise(answer))
        assert exact_match_hf_evaluate([prediction], [answer], **EXACT_MATCH_OPTIONS)["exact_match"] == expected


def exact_match(predictions, keys):
    """pipeline.evaluate's accuracy over the given samples."""
    return sum(normalise(predictions[k]["prediction"]) == normalise(predictions[k]["answer"]) for k in keys) / len(keys)


@pytest.fixture(scope="module")
def sweep_results(models, task_dir, tmp_path_factory):
    folder, _ = task_dir
    out = tmp_path_factory.mktemp("benchmark")
    assert benchmark_tool.main([str(models["final"]), str(models["chatty"]), "--names", "final,chatty",
                                "--tasks", f"{TASK},{CHOICE_TASK}", "--include-path", str(folder), "--tokens", "16,64",
                                "--batch-size", "1", "--model-card", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_benchmark_scores_and_answers_equal_tools_evaluate(sweep_results, evaluation, task_dir):
    _, rows = task_dir
    keys = rows["key"]
    _, report = sweep_results
    results = report["results"]
    assert [(r["model"], r["num_vision_tokens"]) for r in results] == [
        (name, n) for name in ("final", "chatty") for n in (16, 64)]
    for r in results:
        expected = evaluation[(r["model"], r["num_vision_tokens"])]
        answers = [d["responses"] for d in r["responses"][TASK]]
        assert r["samples"] == {TASK: len(keys), CHOICE_TASK: len(keys)}
        assert answers == [[expected[k]["prediction"]] for k in keys]
        assert [d["target"] for d in r["responses"][TASK]] == [expected[k]["answer"] for k in keys]
        assert r["scores"][f"{TASK} exact_match"] == exact_match(expected, keys)
        assert r["prefill_ms"] > 0
    # the models really answer, and N reaches the model: chatty's answers change with N
    chatty = {r["num_vision_tokens"]: [d["responses"][0] for d in r["responses"][TASK]]
              for r in results if r["model"] == "chatty"}
    assert all(chatty[16]) and chatty[16] != chatty[64]


@torch.no_grad()
def test_benchmark_log_likelihoods_equal_the_training_forward(sweep_results, models, task_dir):
    """Multiple choice: each choice's negative log-likelihood is the training forward's summed
    loss on the prompt followed by that choice as the reply; acc picks the smallest."""
    _, rows = task_dir
    _, report = sweep_results
    model = TokenFlexVLM.from_pretrained(models["chatty"]).eval()
    for r in report["results"]:
        if r["model"] != "chatty":
            continue
        n, documents = r["num_vision_tokens"], r["responses"][CHOICE_TASK]
        for document in documents[:6]:
            question, image, choices = (rows[c][document["doc_id"]] for c in ("question", "image", "choices"))
            prompt = model.prompt_ids(question, image is not None)
            pixel_values = None if image is None else model.pixel_values([image.convert("RGB")])
            for choice, (negative_log_likelihood, _) in zip(choices, document["responses"], strict=True):
                target = model.tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]
                sample = {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target,
                          "pixel_values": pixel_values}
                loss = model(model.labelled_batch([sample], n), n).loss
                assert negative_log_likelihood == pytest.approx(float(loss) * len(target), rel=1e-4)
        best = [min(range(len(d["responses"])), key=lambda i: d["responses"][i][0]) for d in documents]
        hits = [b == d["target"] for b, d in zip(best, documents)]
        assert r["scores"][f"{CHOICE_TASK} acc"] == sum(hits) / len(documents)


def test_benchmark_table_plot_and_model_cards(sweep_results, models):
    out, report = sweep_results
    lines = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["model", "N", f"{TASK} exact_match", f"{CHOICE_TASK} acc", "prefill ms"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(row[0], int(row[1])) for row in rows] == [(r["model"], r["num_vision_tokens"]) for r in report["results"]]
    for row, r in zip(rows, report["results"]):
        assert float(row[2]) == float(f"{r['scores'][f'{TASK} exact_match']:.4g}")
        assert float(row[3]) == float(f"{r['scores'][f'{CHOICE_TASK} acc']:.4g}")
        assert float(row[4]) == round(r["prefill_ms"], 2)
    for name, folder in models.items():  # --model-card: each folder's card gets its own rows
        evaluation = (folder / "README.md").read_text().split(f"{EVALUATION_HEADING}\n\n")[1]
        assert [line for line in evaluation.splitlines() if line.startswith("|")] == \
            lines[:2] + [line for line in lines[2:] if line.startswith(f"| {name} |")]
    with Image.open(out / "scores_vs_tokens.png") as image:
        image.verify()
        assert image.format == "PNG"


def test_lmms_eval_cli_on_two_ranks_runs_the_registered_tokenflex_model(models, task_dir, evaluation, sweep_results,
                                                                       tmp_path):
    """`python -m lmms_eval --model tokenflex` from the repository root, data-parallel on two CPU
    ranks: lmms-eval finds the model through its entry point, parses --model_args, splits the
    documents between the ranks and gathers the same answers and scores as one process."""
    folder, rows = task_dir
    keys = rows["key"]
    result = subprocess.run(
        [*map(str, torchrun("2")), "-m", "lmms_eval", "--model", "tokenflex", "--tasks", f"{TASK},{CHOICE_TASK}",
         "--model_args", f"pretrained={models['chatty']},num_vision_tokens=64,device=cpu,dtype=float32",
         "--include_path", str(folder), "--batch_size", "1", "--log_samples", "--output_path", str(tmp_path)],
        cwd=REPO, env=cpu_training_env() | OFFLINE, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Running on rank 1" in result.stdout + result.stderr
    results_file, = tmp_path.glob("*/*_results.json")
    samples_file, = tmp_path.glob(f"*/*_samples_{TASK}.jsonl")
    expected = evaluation[("chatty", 64)]
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in samples] == [expected[k]["prediction"] for k in keys]
    report = json.loads(results_file.read_text())
    assert report["results"][TASK]["exact_match,none"] == exact_match(expected, keys)
    one_process, = (r for r in sweep_results[1]["results"] if (r["model"], r["num_vision_tokens"]) == ("chatty", 64))
    assert report["results"][CHOICE_TASK]["acc,none"] == one_process["scores"][f"{CHOICE_TASK} acc"]
    assert report["throughput"]["avg_num_vision_tokens"] == 64 and report["throughput"]["avg_prefill_ms"] > 0


def test_benchmark_rejects_an_unknown_task_and_a_token_count_beyond_the_grid(models, task_dir, tmp_path, capsys):
    folder, _ = task_dir
    for tasks, tokens, message in [("no_such_task", "16", "lmms-eval knows no task no_such_task"),
                                   (TASK, "16,400", "num_vision_tokens=400 asks for a 20x20 grid")]:
        with pytest.raises(SystemExit) as exit_info:
            benchmark_tool.main([str(models["final"]), "--tasks", tasks, "--include-path", str(folder),
                                 "--tokens", tokens, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
