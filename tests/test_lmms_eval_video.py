"""The tokenflex lmms-eval model on video, run by the real lmms-eval: a local task of held-out clip
questions (the visual: the clip's path, as lmms-eval's video tasks give it) swept by tools.benchmark
over frames x tokens per frame against tools.evaluate; token_budget= choosing N per request, for
generation and for multiple choice; lmms-eval's own MVBench tasks copied by tools.local_tasks and
pointed at the synthetic clips; and the registered model from lmms-eval's CLI with num_frames,
frame_tokens and token_budget (nothing is downloaded).

Outside CI these tests skip when lmms-eval is not installed (requirements-eval.txt); in CI
(CI=true) they fail instead.
"""

import json
import subprocess
import sys

import pytest
import torch
from PIL import ImageFile

from pipeline.model.chat import IGNORE_INDEX, IMAGE_TOKEN, VIDEO_TAG, frames_as_markers, tokenize_record
from pipeline.model.tiles import count_within_budget
from pipeline.model.vlm import TokenFlexVLM
from tests.conftest import require_lmms_eval
from tests.distributed import REPO
from tools import benchmark as benchmark_tool
from tools import build_shards, local_tasks
from tools import evaluate as evaluate_tool
from tools.demo import cpu_training_env

require_lmms_eval()
import datasets  # noqa: E402  (installed with lmms-eval: imported after the check)
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from pipeline.eval.lmms_eval_model import TokenFlexLMMs  # noqa: E402

pytestmark = pytest.mark.timeout(900)
TASK = "synthetic_clips"
CLIPS = 8  # held-out single-turn clip records
FRAMES, FRAME_TOKENS = (2, 4), (4, 16)
HIT_AT = (2, 4)  # (frames, M) at which every other reference answer is the model's own
MVBENCH = ["mvbench_moving_direction", "mvbench_moving_attribute", "mvbench_action_count"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def pil_default_for_truncated_images():
    """lmms-eval's api/task.py sets PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES; restore PIL's default."""
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = False


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


def question_of(record):
    return record["conversations"][0]["value"].removeprefix(f"{IMAGE_TOKEN}\n")


@pytest.fixture(scope="module")
def heldout(video_model, clips, tmp_path_factory):
    """(shards, task folder, rows): the first CLIPS single-turn clip records, every other one's
    answer replaced by the model's own at HIT_AT (answers known to hit: the scores compared are not
    0 == 0), as shards and as the local task TASK (exact match; visual: the clip's path); beside it,
    tools.local_tasks' copies of MVBench's video tasks on the clips' shards."""
    raw = clips / "raw"
    records = [r for r in json.loads((raw / "data.json").read_text())
               if "video" in r and len(r["conversations"]) == 2][:CLIPS]
    model = TokenFlexVLM.from_pretrained(video_model).eval()
    frames, m = HIT_AT
    for record in records[::2]:
        record["conversations"][1]["value"] = model.generate([raw / record["video"]], [question_of(record)], 16, 16,
                                                             num_frame_tokens=m, num_frames=frames)[0]
    folder = tmp_path_factory.mktemp("heldout_clips")
    (folder / "data.json").write_text(json.dumps(records))
    build_shards.build(str(folder / "data.json"), str(raw), str(folder / "shards"), samples_per_shard=4)
    rows = {"question": [question_of(r) for r in records], "answer": [r["conversations"][1]["value"] for r in records],
            "video": [str(raw / r["video"]) for r in records], "type": [r["question_type"] for r in records]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(folder / "data")
    (folder / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: {folder / "data"}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: video
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: ["^\\\\s+", "[.,;:!?\\\\s]+$"]
""")
    assert local_tasks.main(["--out", str(folder / "lmms"), "--synthetic", str(clips / "shards"), "--limit", "12"]) == 0
    return folder / "shards", folder, rows


@pytest.fixture(scope="module")
def sweep(video_model, heldout, tmp_path_factory):
    """tools.benchmark on TASK over FRAMES x FRAME_TOKENS, and tools.evaluate on the same clips alike."""
    shards, folder, _ = heldout
    out = tmp_path_factory.mktemp("video_sweep")
    options = ["--tokens", "16", "--frames", ",".join(map(str, FRAMES)), "--frame-tokens",
               ",".join(map(str, FRAME_TOKENS)), "--batch-size", "2"]
    assert benchmark_tool.main([str(video_model), "--tasks", TASK, "--include-path", str(folder), *options,
                                "--timing-repeats", "1", "--out", str(out / "bench")]) == 0
    assert evaluate_tool.main([str(video_model), "--shards", str(shards), *options, "--max-new-tokens", "16",
                               "--out", str(out / "eval")]) == 0
    return out, json.loads((out / "bench" / "results.json").read_text()), json.loads(
        (out / "eval" / "results.json").read_text())


def test_benchmark_answers_and_scores_clips_as_tools_evaluate_at_every_frame_count_and_m(sweep, heldout):
    out, bench, evaluation = sweep
    _, _, rows = heldout
    settings = [(f, m) for f in FRAMES for m in FRAME_TOKENS]
    assert [(r["num_frames"], r["num_frame_tokens"]) for r in bench["results"]] == settings
    assert [(r["num_frames"], r["num_frame_tokens"]) for r in evaluation["results"]] == settings
    answers = {}
    for ours, theirs in zip(bench["results"], evaluation["results"]):
        predictions = [p["prediction"] for p in theirs["predictions"]]
        assert [d["responses"][0] for d in ours["responses"][TASK]] == predictions
        assert [d["target"] for d in ours["responses"][TASK]] == rows["answer"]
        hits = sum(p.strip().lower() == a.strip().lower() for p, a in zip(predictions, rows["answer"]))
        assert ours["scores"][f"{TASK} exact_match"] == pytest.approx(hits / CLIPS) == pytest.approx(theirs["accuracy"])
        assert ours["vision_tokens_per_clip"] == theirs["vision_tokens_per_clip"] == ours["num_frames"] * (
            ours["num_frame_tokens"] + 1)
        answers[ours["num_frames"], ours["num_frame_tokens"]] = predictions
    hit = next(r for r in bench["results"] if (r["num_frames"], r["num_frame_tokens"]) == HIT_AT)
    assert hit["scores"][f"{TASK} exact_match"] >= 0.5  # the answers known to hit do
    assert len({tuple(a) for a in answers.values()}) > 1  # frames and M reach the model
    assert (out / "bench" / "scores_vs_frames.png").stat().st_size > 0
    header = (out / "bench" / "results.md").read_text().split("| model | N | frames | M |")
    assert len(header) == 2


def test_token_budget_picks_n_for_each_request_in_generation_and_in_multiple_choice(video_model, heldout):
    _, _, rows = heldout
    model = TokenFlexVLM.from_pretrained(video_model).eval()
    task_manager = TaskManager(include_path=str(heldout[1]))
    for budget in (20, 60):
        n = count_within_budget([(1, 1)] * 4, [True] * 4, budget, model.config.grid_side())  # 4 frames a clip
        assert n == {20: 4, 60: 9}[budget]  # 4 x (4 + 1) <= 20 < 4 x (9 + 1); 4 x (9 + 1) <= 60 < 4 x (16 + 1)
        lmms = TokenFlexLMMs(model, 64, num_frames=4, token_budget=budget, batch_size=2)
        output = simple_evaluate(model=lmms, tasks=[TASK], task_manager=task_manager, log_samples=True)
        answers = [s["filtered_resps"][0] for s in output["samples"][TASK]]
        assert answers == [model.generate([video], [question], n, 16, num_frame_tokens=n, num_frames=4)[0].strip()
                           for video, question in zip(rows["video"], rows["question"])]
    # multiple choice: each choice scored as the training forward scores the reply, at the budget's N
    lmms = TokenFlexLMMs(model, 64, num_frames=4, token_budget=60, batch_size=3)
    documents = [{"video": video, "question": question, "choices": [answer, "blue"]}
                 for video, question, answer in zip(rows["video"][:3], rows["question"][:3], rows["answer"][:3])]
    lmms.task_dict = {"choices": {"test": documents}}
    requests = [Instance("loglikelihood", (doc["question"], f" {choice}", lambda d: [d["video"]], i, "choices", "test"),
                         idx=c, metadata={"task": "choices", "doc_id": i, "repeats": 1})
                for i, doc in enumerate(documents) for c, choice in enumerate(doc["choices"])]
    scores = [r.text[0] for r in lmms.loglikelihood(requests)]
    expected = [training_forward(model, doc["video"], doc["question"], choice, 9)
                for doc in documents for choice in doc["choices"]]
    assert scores == pytest.approx(expected, rel=1e-4)


@torch.no_grad()
def training_forward(model, video, question, reply, n):
    """The summed loss of the training forward over the clip's user turn answered by reply, frames
    and images at N."""
    sample = model.prepared_images([video], num_frames=4)
    record = {"conversations": [{"from": "human", "value": f"{VIDEO_TAG}\n{question}"},
                                {"from": "gpt", "value": reply}]}
    ids, labels = tokenize_record(record, model.tokenizer, 1)  # as training tokenizes a clip's record
    ids, labels = frames_as_markers(ids, labels, model.config.image_token_id, sample["frames_per_visual"])
    batch = model.labelled_batch([{"input_ids": ids, "labels": labels, **sample}], n, n)
    supervised = int((batch["labels"][0, 1:] != IGNORE_INDEX).sum())
    return float(model(batch, n, num_frame_tokens=n).loss) * supervised


def test_lmms_evals_own_mvbench_tasks_score_the_models_answers_on_synthetic_clips(video_model, heldout, tmp_path):
    """MVBench's moving_direction, moving_attribute and action_count, copied by tools.local_tasks and
    pointed at the clips: each answer is the model's greedy answer to MVBench's own prompt on the
    clip, and MVBench's metric scores them."""
    from lmms_eval.tasks.mvbench.utils import mcq_acc

    _, folder, _ = heldout
    tasks = [f"{task}_local" for task in MVBENCH]
    assert benchmark_tool.main([str(video_model), "--tasks", ",".join(tasks), "--include-path", str(folder / "lmms"),
                                "--tokens", "16", "--frames", "2", "--frame-tokens", "4", "--timing-repeats", "1",
                                "--out", str(tmp_path)]) == 0
    result, = json.loads((tmp_path / "results.json").read_text())["results"]
    model = TokenFlexVLM.from_pretrained(video_model).eval()
    for task in MVBENCH:
        data = datasets.load_from_disk(str(folder / "lmms" / "data" / task))["train"]
        responses = result["responses"][f"{task}_local"]
        assert len(responses) == len(data) > 0
        for row, document in zip(data, responses):
            assert document["input"].startswith("Question:" + row["question"]) and "(A) " in document["input"]
            expected = model.generate([row["video"]], [document["input"]], 16, 16, num_frame_tokens=4, num_frames=2)
            assert document["responses"][0] == expected[0].strip()
        letters = [mcq_acc("ABCD"[row["candidates"].index(row["answer"])], d["responses"][0])
                   for row, d in zip(data, responses)]
        assert result["scores"][f"{task}_local mvbench_accuracy"] == pytest.approx(100 * sum(letters) / len(letters))


def test_lmms_eval_cli_runs_the_registered_model_on_clips_with_a_token_budget(video_model, heldout, tmp_path):
    _, folder, rows = heldout
    command = [sys.executable, "-m", "lmms_eval", "--model", "tokenflex", "--tasks", TASK, "--include_path",
               str(folder), "--output_path", str(tmp_path), "--log_samples", "--verbosity", "DEBUG", "--model_args",
               f"pretrained={video_model},num_frames=2,token_budget=10"]
    result = subprocess.run(command, cwd=REPO, env=cpu_training_env() | OFFLINE, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    samples_file, = tmp_path.glob(f"*/*_samples_{TASK}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    answers = {s["doc_id"]: s["filtered_resps"] for s in samples}
    assert len(answers) == CLIPS
    model = TokenFlexVLM.from_pretrained(video_model).eval()
    assert count_within_budget([(1, 1)] * 2, [True] * 2, 10, model.config.grid_side()) == 4  # 2 x (4 + 1) = 10
    for doc_id, (video, question) in enumerate(zip(rows["video"], rows["question"])):
        assert answers[doc_id] == model.generate([video], [question], 4, 16, num_frame_tokens=4, num_frames=2)[0]
