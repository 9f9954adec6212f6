"""tools.benchmark, tools.local_tasks and the tokenflex model run by the real lmms-eval: on a local
task written from the synthetic held-out shards, against tools.evaluate, and on lmms-eval's own
pope, mme and seedbench_ppl, copied from the installed package and pointed at small datasets of
their schemas built from the held-out images (nothing is downloaded).

Outside CI these tests skip when lmms-eval is not installed (requirements-eval.txt); in CI
(CI=true) they fail instead.
"""

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageFile

from pipeline.data.mixture import resolve_source
from pipeline.eval.heldout import normalise
from pipeline.export.model_card import EVALUATION_HEADING
from pipeline.model.chat import IGNORE_INDEX, IMAGE_TOKEN, tokenize_record
from pipeline.model.vlm import TokenFlexVLM
from tests.conftest import require_lmms_eval, save_chatty_copy
from tests.distributed import REPO
from tools import benchmark as benchmark_tool
from tools import build_shards, local_tasks
from tools import evaluate as evaluate_tool
from tools.demo import cpu_training_env, torchrun
from tools.report import benchmark_table, latency_noise

require_lmms_eval()
import datasets  # noqa: E402  (installed with lmms-eval: imported after the check)

pytestmark = pytest.mark.timeout(900)
TASK = "synthetic_heldout"
CHOICE_TASK = "synthetic_heldout_choice"  # the same questions, the answer against one wrong choice
# lmms-eval's exact_match options in the task YAML that score as pipeline.eval.heldout.normalise does
EXACT_MATCH_OPTIONS = {"ignore_case": True, "regexes_to_ignore": [r"^\s+", r"[.,;:!?\s]+$"]}
LIMIT = 24  # the first samples of the shards; the task keeps the single-turn ones
REAL_TASKS = ["pope_local", "mme_local", "seedbench_ppl_local"]  # lmms-eval's own, on local data
SCENES = 4  # held-out scenes in the real tasks' datasets
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
def models(stage1_run, tmp_path_factory):
    """A copy of the run's final folder (its model answers only newlines, empty once stripped;
    tools.benchmark --model-card writes into its card) and "chatty", the same weights made to
    answer visibly (conftest.save_chatty_copy)."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(stage1_run / "final", root / "final")
    save_chatty_copy(stage1_run / "final", root / "chatty")
    return {"final": root / "final", "chatty": root / "chatty"}


@pytest.fixture(scope="module")
def heldout(models, synthetic_shards, tmp_path_factory):
    """Shards of the first LIMIT synthetic records in which every other single-turn image
    question is answered with what chatty answers at N=16: answers known to hit, so that the
    exact-match scores compared below are not 0 == 0 (the barely trained model gets none of the
    real answers right). Returns the shards and the fraction of questions changed so."""
    raw = synthetic_shards.parent / "raw"
    records = json.loads((raw / "data.json").read_text())[:LIMIT]
    chatty = TokenFlexVLM.from_pretrained(models["chatty"]).eval()
    singles = [r for r in records if len(r["conversations"]) == 2]
    hits = [r for r in singles if "image" in r][::2]
    for record in hits:
        question = record["conversations"][0]["value"].removeprefix(f"{IMAGE_TOKEN}\n")
        with Image.open(raw / record["image"]) as image:
            record["conversations"][1]["value"] = chatty.generate([image.convert("RGB")], [question], 16, 16)[0]
    folder = tmp_path_factory.mktemp("heldout")
    (folder / "data.json").write_text(json.dumps(records))
    build_shards.build(str(folder / "data.json"), str(raw), str(folder / "shards"), samples_per_shard=8)
    return folder / "shards", len(hits) / len(singles)


@pytest.fixture(scope="module")
def task_dir(heldout, synthetic_shards, tmp_path_factory):
    """An lmms-eval task folder: the single-turn records of the held-out shards as a local
    dataset (question without its image marker, answer, image or None), a generation task
    scoring them with lmms-eval's exact_match, normalised as pipeline.eval.heldout does (case and
    trailing punctuation ignored), and a multiple-choice one (log-likelihoods); beside them,
    tools.local_tasks' copies of lmms-eval's pope, mme and seedbench_ppl on SCENES held-out scenes."""
    folder = tmp_path_factory.mktemp("lmms_task")
    rows = {"key": [], "question": [], "answer": [], "choices": [], "image": []}
    for sample in wds.tarfile_to_samples()({"url": url} for url in resolve_source(str(heldout[0]))[0]):
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
    assert local_tasks.main(["--out", str(folder / "lmms"), "--synthetic", str(synthetic_shards),
                             "--limit", str(SCENES)]) == 0
    return folder, rows


@pytest.fixture(scope="module")
def evaluation(models, heldout, tmp_path_factory):
    """tools/evaluate's predictions per (model, N), keyed by sample."""
    out = tmp_path_factory.mktemp("evaluation")
    assert evaluate_tool.main([str(models["final"]), str(models["chatty"]), "--names", "final,chatty",
                               "--shards", str(heldout[0]), "--tokens", "16,64", "--limit", str(LIMIT),
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
    """pipeline.eval.heldout's accuracy over the given samples."""
    return sum(normalise(predictions[k]["prediction"]) == normalise(predictions[k]["answer"]) for k in keys) / len(keys)


@pytest.fixture(scope="module")
def sweep_results(models, task_dir, tmp_path_factory):
    folder, _ = task_dir
    out = tmp_path_factory.mktemp("benchmark")
    assert benchmark_tool.main([str(models["final"]), str(models["chatty"]), "--names", "final,chatty",
                                "--tasks", f"{TASK},{CHOICE_TASK}", "--include-path", str(folder), "--tokens", "16,64",
                                "--batch-size", "1", "--timing-repeats", "3", "--model-card", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def real_task_results(models, task_dir, tmp_path_factory):
    """lmms-eval's own pope, mme and seedbench_ppl (tools.local_tasks' copies) run by the sweep:
    chatty at N=16."""
    folder, _ = task_dir
    out = tmp_path_factory.mktemp("real_tasks")
    assert benchmark_tool.main([str(models["chatty"]), "--tasks", ",".join(REAL_TASKS), "--include-path", str(folder),
                                "--tokens", "16", "--timing-repeats", "3", "--out", str(out)]) == 0
    result, = json.loads((out / "results.json").read_text())["results"]
    assert result["samples"] == {"pope_local": 2 * SCENES, "mme_local": 2 * SCENES, "seedbench_ppl_local": SCENES}
    return result


def test_benchmark_scores_and_answers_equal_tools_evaluate(sweep_results, evaluation, task_dir, heldout):
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
        assert 0 < r["prefill_ms_q1"] <= r["prefill_ms"] <= r["prefill_ms_q3"]
    # the models really answer, and N reaches the model: chatty's answers change with N
    chatty = {r["num_vision_tokens"]: [d["responses"][0] for d in r["responses"][TASK]]
              for r in results if r["model"] == "chatty"}
    assert all(chatty[16]) and chatty[16] != chatty[64]
    # the compared score is not 0 == 0: the answers known to hit do
    chatty_16, = (r for r in results if (r["model"], r["num_vision_tokens"]) == ("chatty", 16))
    assert chatty_16["scores"][f"{TASK} exact_match"] >= heldout[1] > 0


@torch.no_grad()
def training_forward(model, question, reply, image, n):
    """(summed loss, whether every token is the argmax) of the training forward over the user
    turn answered by reply, the conversation formatted and tokenized as training does it."""
    user = question if image is None else f"{IMAGE_TOKEN}\n{question}"
    record = {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": reply}]}
    ids, labels = tokenize_record(record, model.tokenizer, int(image is not None))
    images = [] if image is None else [image.convert("RGB")]
    batch = model.labelled_batch([{"input_ids": ids, "labels": labels, **model.prepared_images(images)}], n)
    output = model(batch, n, return_logits=True)
    supervised = batch["labels"][0, 1:] != IGNORE_INDEX
    greedy = bool((output.logits[0, :-1][supervised].argmax(-1) == batch["labels"][0, 1:][supervised]).all())
    return float(output.loss) * int(supervised.sum()), greedy


def assert_choices_scored_by_the_training_forward(model, result, task, choices_of, image_of, documents=None):
    """Each choice's (negative log-likelihood, is-greedy) is the training forward's on the task's
    prompt answered by that choice, and the task's acc picks the smallest."""
    n = result["num_vision_tokens"]
    for document in result["responses"][task][:documents]:
        i = int(document["doc_id"])
        expected = [training_forward(model, document["input"], choice, image_of(i), n) for choice in choices_of(i)]
        assert [nll for nll, _ in document["responses"]] == pytest.approx([loss for loss, _ in expected], rel=1e-4)
        assert [greedy for _, greedy in document["responses"]] == [greedy for _, greedy in expected]
    scored = result["responses"][task]
    best = [min(range(len(d["responses"])), key=lambda c: d["responses"][c][0]) for d in scored]
    targets = [d["target"] if isinstance(d["target"], int) else choices_of(int(d["doc_id"])).index(d["target"])
               for d in scored]
    assert result["scores"][f"{task} acc"] == sum(b == t for b, t in zip(best, targets)) / len(scored)


def test_benchmark_log_likelihoods_equal_the_training_forward(sweep_results, real_task_results, models, task_dir):
    """Multiple choice, on the local task at two N and on lmms-eval's seedbench_ppl (whose
    continuations come with lmms-eval's leading space): scored as the reply, as training scores it."""
    folder, rows = task_dir
    model = TokenFlexVLM.from_pretrained(models["chatty"]).eval()
    for result in (r for r in sweep_results[1]["results"] if r["model"] == "chatty"):
        assert_choices_scored_by_the_training_forward(model, result, CHOICE_TASK, lambda i: rows["choices"][i],
                                                      lambda i: rows["image"][i], documents=6)
    seedbench = datasets.load_from_disk(str(folder / "lmms" / "data" / "seedbench"))["test"]
    assert_choices_scored_by_the_training_forward(model, real_task_results, "seedbench_ppl_local",
                                                  lambda i: [seedbench[i][f"choice_{c}"] for c in "abcd"],
                                                  lambda i: seedbench[i]["image"][0])


def test_lmms_eval_own_generation_tasks_score_the_models_greedy_answers(real_task_results, models, task_dir):
    """pope and mme, run by lmms-eval from its own folders on local data: each answer is the
    model's greedy answer to the task's own prompt, and the task's metrics score them."""
    from lmms_eval.tasks.mme.utils import parse_pred_ans

    folder, _ = task_dir
    model = TokenFlexVLM.from_pretrained(models["chatty"]).eval()
    responses = real_task_results["responses"]
    for task, kind, max_new_tokens in (("pope_local", "pope", 128), ("mme_local", "mme", 16)):  # tasks' own settings
        data = datasets.load_from_disk(str(folder / "lmms" / "data" / kind))["test"]
        assert [d["input"] for d in responses[task]] == [
            row["question"].replace(" Please answer yes or no.", "") +
            "\nAnswer the question using a single word or phrase." for row in data]
        answers = [model.generate([row["image"].convert("RGB")], [d["input"]], 16, max_new_tokens)[0]
                   for row, d in zip(data, responses[task])]
        assert [d["responses"][0] for d in responses[task]] == answers
    pope = [d["responses"][0].lower().strip() == d["target"] for d in responses["pope_local"]]
    assert real_task_results["scores"]["pope_local pope_accuracy"] == sum(pope) / len(pope)
    hits = [parse_pred_ans(d["responses"][0]) == d["target"].lower() for d in responses["mme_local"]]
    pairs = [hits[i:i + 2] for i in range(0, len(hits), 2)]  # one image's two questions follow each other
    assert real_task_results["scores"]["mme_local mme_perception_score"] == pytest.approx(
        sum(50 * sum(p) + 100 * all(p) for p in pairs) / len(pairs))


def test_local_tasks_change_only_where_the_data_comes_from_and_the_name(task_dir):
    """Each copy keeps its task's folder (utils.py byte for byte, the YAML line for line) but for
    task, dataset_path and dataset_kwargs; the folder's other tasks are not copied."""
    import lmms_eval

    folder, _ = task_dir
    installed = Path(lmms_eval.__file__).parent / "tasks"
    for task, source in (("pope", "pope/pope.yaml"), ("mme", "mme/mme.yaml"),
                         ("seedbench_ppl", "seedbench/seedbench_ppl.yaml")):
        copy = folder / "lmms" / f"{task}_local"
        original = installed / source
        assert sorted(p.name for p in copy.iterdir() if p.suffix == ".yaml") == [original.name]
        for module in original.parent.glob("*.py"):
            assert (copy / module.name).read_bytes() == module.read_bytes()
        lines = (copy / original.name).read_text().splitlines()
        changed = ["task:", "dataset_path:", "dataset_kwargs:", "  token:", "  load_from_disk:"]
        kept = [line for line in original.read_text().splitlines() if not line.startswith(tuple(changed))]
        assert [line for line in lines if not line.startswith(tuple(changed))] == kept
        assert f"task: {task}_local" in lines and "  load_from_disk: true" in lines
        assert f"dataset_path: {folder / 'lmms' / 'data' / local_tasks.SYNTHETIC[task]}" in lines


def test_benchmark_table_plot_and_model_cards(sweep_results, models):
    out, report = sweep_results
    text = (out / "results.md").read_text()
    assert "the median (and q1–q3) of 3 timed prefills, after a warm-up, of a batch of 1 prompts" in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    metrics = list(dict.fromkeys(m for r in report["results"] for m in r["scores"]))
    assert header == ["model", "N", f"{TASK} exact_match", f"{CHOICE_TASK} acc", "prefill ms", "prefill q1–q3"] == \
        ["model", "N", *metrics, "prefill ms", "prefill q1–q3"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(row[0], int(row[1])) for row in rows] == [(r["model"], r["num_vision_tokens"]) for r in report["results"]]
    for row, r in zip(rows, report["results"]):
        assert [float(cell) for cell in row[2:-2]] == [float(f"{r['scores'][m]:.4g}") for m in metrics]
        assert row[-2:] == [f"{r['prefill_ms']:.2f}", f"{r['prefill_ms_q1']:.2f}–{r['prefill_ms_q3']:.2f}"]
    for name, folder in models.items():  # --model-card: each folder's card gets its own rows
        evaluation = (folder / "README.md").read_text().split(f"{EVALUATION_HEADING}\n\n")[1]
        assert [line for line in evaluation.splitlines() if line.startswith("|")] == \
            lines[:2] + [line for line in lines[2:] if line.startswith(f"| {name} |")]
    with Image.open(out / "scores_vs_tokens.png") as image:
        image.verify()
        assert image.format == "PNG"


def latency_row(model, n, median, q1, q3):
    return {"model": model, "num_vision_tokens": n, "scores": {}, "samples": {}, "prefill_ms": median,
            "prefill_ms_q1": q1, "prefill_ms_q3": q3}


def test_report_says_when_the_prefill_spread_is_larger_than_its_differences_across_n():
    clear = [latency_row("a", 16, 10, 9.8, 10.3), latency_row("a", 64, 20, 19.5, 20.4)]
    noisy = [latency_row("b", 16, 30, 12, 90), latency_row("b", 64, 25, 20, 400)]  # N=16 "slower" than N=64
    assert latency_noise(clear) == [] and latency_noise(noisy) == ["b"] and latency_noise(clear + noisy) == ["b"]
    table = benchmark_table({"results": clear + noisy, "batch_size": 8, "timing_repeats": 5})
    assert "spread is larger than its differences across N for b:" in table
    assert "| a | 16 | 10.00 | 9.80–10.30 |" in table
    assert "spread" not in benchmark_table({"results": clear, "batch_size": 8, "timing_repeats": 5})


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


def test_benchmark_rejects_an_unknown_task_and_a_token_count_that_is_not_a_positive_square_in_the_grid(
        models, task_dir, tmp_path, capsys):
    folder, _ = task_dir
    for tasks, tokens, message in [("no_such_task", "16", "lmms-eval knows no task no_such_task"),
                                   (TASK, "16,400", "num_vision_tokens=400 asks for a 20x20 grid"),
                                   (TASK, "0", "num_vision_tokens=0 is not a perfect square n*n with n >= 1")]:
        with pytest.raises(SystemExit) as exit_info:  # --dtype takes torch's names, as lmms-eval's dtype= does
            benchmark_tool.main([str(models["final"]), "--tasks", tasks, "--include-path", str(folder),
                                 "--tokens", tokens, "--dtype", "bfloat16", "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_benchmark_failure_names_model_n_and_task_and_keeps_the_finished_results(models, task_dir, tmp_path, capsys):
    """MME scores each image's pair of questions; --limit 3 cuts a pair, and its own assertion
    fails. tools.benchmark says which model, N and task failed, without a raw traceback, keeps
    the task that finished and exits 1."""
    folder, _ = task_dir
    code = benchmark_tool.main([str(models["chatty"]), "--tasks", "pope_local,mme_local", "--include-path", str(folder),
                                "--tokens", "16", "--limit", "3", "--timing-repeats", "1", "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 1
    assert ("model chatty at N=16, task mme_local: AssertionError: MME only supports pairwise evaluation. "
            "With --limit 3: a task that scores groups of documents") in error
    assert "Traceback" not in error
    report = json.loads((tmp_path / "results.json").read_text())
    finished, = report["results"]
    assert set(finished["scores"]) == {f"pope_local pope_{m}" for m in ("accuracy", "precision", "recall", "f1_score",
                                                                          "yes_ratio")}
    assert finished["samples"] == {"pope_local": 3} and finished["prefill_ms"] is None
    assert report["failure"]["task"] == "mme_local" and "assert len(scores) == 2" in report["failure"]["traceback"]
    table = (tmp_path / "results.md").read_text()
    assert "Failed: model chatty at N=16, task mme_local" in table and "| chatty | 16 |" in table


def test_lmms_eval_cli_exits_0_after_an_error(models, task_dir, tmp_path):
    """What the README says of lmms-eval's own CLI: after an error it prints the traceback and
    "Error during evaluation", writes no results, and still exits 0."""
    folder, _ = task_dir
    result = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "tokenflex", "--tasks", "mme_local", "--limit", "3",
         "--include_path", str(folder), "--output_path", str(tmp_path),
         "--model_args", f"pretrained={models['chatty']},num_vision_tokens=16"],
        cwd=REPO, env=cpu_training_env() | OFFLINE, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0
    assert "Error during evaluation: MME only supports pairwise evaluation" in result.stdout + result.stderr
    assert not list(tmp_path.glob("*/*_results.json"))


def test_pip_check_reports_only_the_omissions_requirements_eval_documents():
    """requirements-eval.txt installs lmms-eval without its declared dependencies and names the
    ones it leaves out; pip check must find nothing else missing or conflicting."""
    text = (REPO / "requirements-eval.txt").read_text()
    left_out = {name for line in re.findall(r"^#     (.+)$", text, re.M) for name in line.split()}
    assert "torchvision" in left_out and "wandb==0.25.0" in text
    report = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False).stdout
    for line in report.splitlines():
        missing = re.fullmatch(r"lmms-eval 0\.7\.3 requires ([\w.-]+), which is not installed\.", line)
        pinned = re.fullmatch(r"lmms-eval 0\.7\.3 has requirement wandb==0\.25\.0, but you have wandb [\d.]+\.", line)
        assert pinned or (missing and missing.group(1) in left_out), line


def test_local_task_names_a_bad_task_or_dataset(tmp_path):
    import lmms_eval

    pope = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    index = {"pope": {"type": "task", "yaml_path": str(pope)}, "pope_full": {"type": "group", "yaml_path": str(pope)}}
    with pytest.raises(ValueError, match="has no task 'no_such_task'"):
        local_tasks.local_task("no_such_task", tmp_path, tmp_path / "out", index)
    with pytest.raises(ValueError, match="has no task 'pope_full' \\(it is a group; name its tasks\\)"):
        local_tasks.local_task("pope_full", tmp_path, tmp_path / "out", index)
    with pytest.raises(
        ValueError, match=f"pope={tmp_path / 'missing'}: not a folder written by datasets' save_to_disk"
    ):
        local_tasks.local_task("pope", tmp_path / "missing", tmp_path / "out", index)
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"question": ["q"]})}).save_to_disk(tmp_path / "val")
    with pytest.raises(
        ValueError, match=r"the task reads test_split 'test', but the dataset's splits are \['validation'\]"
    ):
        local_tasks.local_task("pope", tmp_path / "val", tmp_path / "out", index)
    assert not (tmp_path / "out").exists()
