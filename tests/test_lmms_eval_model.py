"""The tokenflex lmms-eval model on the tiny real checkpoints, given lmms-eval's own request
objects: each batch's prompts go through the LM once, multiple-choice continuations are scored as
the training forward scores the assistant's reply, an image is encoded once for all of its
choices, and bad model arguments are refused.

Outside CI these tests skip when lmms-eval is not installed (requirements-eval.txt); in CI
(CI=true) they fail instead.
"""

import argparse
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from pipeline.model.chat import IGNORE_INDEX, IMAGE_TOKEN, tokenize_record
from pipeline.model.vlm import TokenFlexVLM
from tests.conftest import require_lmms_eval, save_chatty_copy
from tools.options import add_placement_options

require_lmms_eval()
# after the check: these need lmms-eval
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history, reset_logged_metrics  # noqa: E402

from pipeline.eval.lmms_eval_model import TokenFlexLMMs, default_device  # noqa: E402

N = 16
TASK, SPLIT = "colours", "test"
DOCUMENTS = [
    {"question": "What colour is the background?", "choices": ["red", "blue", "black", "a long green reply"],
     "image": Image.new("RGB", (64, 64), "red")},
    {"question": "What is two plus three?", "choices": ["five", "six"], "image": None},
    {"question": "What colour is the small square?", "choices": ["navy", "lime", "olive"],
     "image": Image.new("RGB", (64, 64), "navy")},
]


@pytest.fixture(scope="module", autouse=True)
def pil_default_for_truncated_images():
    """Importing lmms-eval's api/task.py sets PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES;
    give the rest of the suite PIL's default back (build_shards rejects truncated images)."""
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = False


@pytest.fixture(scope="module")
def model(tiny_models):
    torch.manual_seed(0)  # the projector is random-init
    return TokenFlexVLM.from_components(tiny_models / "vision", tiny_models / "qwen2").eval()


def lmms(model, batch_size):
    harness = TokenFlexLMMs(model, N, batch_size=batch_size)
    harness.task_dict = {TASK: {SPLIT: DOCUMENTS}}  # what lmms-eval's evaluator sets
    return harness


def doc_to_visual(document):
    return [document["image"]] if document["image"] is not None else []


def choice_requests():
    """lmms-eval's multiple-choice requests (api/task.py): one per choice, with its leading delimiter."""
    return [Instance("loglikelihood", (doc["question"], f" {choice}", doc_to_visual, doc_id, TASK, SPLIT), idx=i,
                     metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
            for doc_id, doc in enumerate(DOCUMENTS) for i, choice in enumerate(doc["choices"])]


class ForwardCounter:
    """Within its with-block, the batch size of each forward of a module whose input is longer than length_over."""

    def __init__(self, module, length_over=0):
        self.module, self.length_over, self.calls = module, length_over, []

    def __enter__(self):
        self.hook = self.module.register_forward_pre_hook(self.record, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.hook.remove()

    def record(self, module, args, kwargs):
        inputs = [*args, *(kwargs.get(k) for k in ("input_ids", "inputs_embeds", "pixel_values"))]
        tensor = next(t for t in inputs if t is not None)
        if tensor.shape[1] > self.length_over:
            self.calls.append(tensor.shape[0])


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmms_model") / "model"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chatty(model_dir, tmp_path_factory):
    """The model made to answer visibly (conftest.save_chatty_copy): the random-init LM answers only
    newlines or special tokens, which are empty once stripped."""
    return TokenFlexVLM.from_pretrained(save_chatty_copy(model_dir, tmp_path_factory.mktemp("lmms_chatty"))).eval()


@torch.no_grad()
def training_forward(model, question, reply, image):
    """(summed loss, whether every token is the argmax) of the training forward over a
    conversation's reply and its end token: the user turn answered by reply, tokenized as
    training tokenizes it."""
    images = [] if image is None else image if isinstance(image, list) else [image]
    user = f"{IMAGE_TOKEN}\n" * len(images) + question
    record = {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": reply}]}
    ids, labels = tokenize_record(record, model.tokenizer, len(images))
    batch = model.labelled_batch([{"input_ids": ids, "labels": labels, **model.prepared_images(images)}], N)
    output = model(batch, N, return_logits=True)
    supervised = batch["labels"][0, 1:] != IGNORE_INDEX
    greedy = bool((output.logits[0, :-1][supervised].argmax(-1) == batch["labels"][0, 1:][supervised]).all())
    return float(output.loss) * int(supervised.sum()), greedy


def test_choices_are_scored_as_the_training_forward_scores_the_reply(model):
    """Negative log-likelihoods and greedy flags equal the training forward's on the whole
    formatted conversation, not on the continuation tokenized apart (" black" as one piece
    instead of the reply's tokens after the assistant header)."""
    results = lmms(model, batch_size=3).loglikelihood(choice_requests())
    expected = [training_forward(model, doc["question"], choice, doc["image"])
                for doc in DOCUMENTS for choice in doc["choices"]]
    assert [r.text[0] for r in results] == pytest.approx([loss for loss, _ in expected], rel=1e-4)
    assert [r.text[1] for r in results] == [greedy for _, greedy in expected]


@pytest.mark.parametrize("batch_size, lm_batches", [(1, [1] * 9), (4, [4, 2, 3])])
def test_loglikelihood_encodes_each_image_once_and_batches_the_choices(model, batch_size, lm_batches):
    with ForwardCounter(model.vision_tower) as vision, ForwardCounter(model.language_model.model) as language:
        results = lmms(model, batch_size).loglikelihood(choice_requests())
    assert vision.calls == [1, 1]  # two documents with an image, each encoded once for all its choices
    assert language.calls == lm_batches
    assert len(results) == sum(len(doc["choices"]) for doc in DOCUMENTS)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_generate_until_runs_each_batch_through_the_lm_once(model, batch_size):
    requests = [Instance("generate_until", (doc["question"], {"max_new_tokens": 4, "until": ["\n\n"]}, doc_to_visual,
                                            doc_id, TASK, SPLIT), idx=0,
                         metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
                for doc_id, doc in enumerate(DOCUMENTS)]
    with ForwardCounter(model.language_model.model, length_over=1) as prefills:  # decoding feeds one token a step
        answers = lmms(model, batch_size).generate_until(requests)
    assert len(prefills.calls) == -(-len(DOCUMENTS) // batch_size) and sum(prefills.calls) == len(DOCUMENTS)
    if batch_size == 1:
        assert answers == [model.generate([doc["image"]], [doc["question"]], N, 4)[0].split("\n\n")[0].strip()
                           for doc in DOCUMENTS]


def test_multi_image_documents_are_scored_and_answered_with_every_image(model):
    """A document with two images (lmms-eval's doc_to_visual gives a list): both go into the
    prompt, in order, for loglikelihood and generate_until; a video (a path) is refused."""
    two = {"question": "Which image is red?", "choices": ["first", "second"],
           "image": [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (128, 64), "blue")]}
    harness = TokenFlexLMMs(model, N, batch_size=2)
    harness.task_dict = {TASK: {SPLIT: [two]}}

    def visuals(document):
        return document["image"]
    requests = [Instance("loglikelihood", (two["question"], f" {c}", visuals, 0, TASK, SPLIT), idx=i,
                         metadata={"task": TASK, "doc_id": 0, "repeats": 1}) for i, c in enumerate(two["choices"])]
    with ForwardCounter(model.vision_tower) as vision:
        results = harness.loglikelihood(requests)
    assert vision.calls == [2]  # both images, encoded once for both choices
    expected = [training_forward(model, two["question"], c, two["image"]) for c in two["choices"]]
    assert [r.text[0] for r in results] == pytest.approx([loss for loss, _ in expected], rel=1e-4)
    swapped = training_forward(model, two["question"], "first", two["image"][::-1])[0]
    assert swapped != pytest.approx(expected[0][0], rel=1e-4)  # the order of the images matters
    answer = harness.generate_until([Instance("generate_until", (two["question"], {"max_new_tokens": 3}, visuals, 0,
                                                                 TASK, SPLIT), idx=0,
                                              metadata={"task": TASK, "doc_id": 0, "repeats": 1})])
    assert answer == [model.generate([two["image"]], [two["question"]], N, 3)[0].strip()]
    harness.task_dict = {TASK: {SPLIT: [dict(two, image=["clip.mp4"])]}}
    with pytest.raises(ValueError, match="tokenflex takes images only"):
        harness.generate_until([Instance("generate_until", (two["question"], {}, visuals, 0, TASK, SPLIT), idx=0,
                                         metadata={"task": TASK, "doc_id": 0, "repeats": 1})])


def test_num_tiles_cuts_each_image_into_that_many_tiles_at_most(model):
    """num_tiles (model_args) overrides the folder's tile limit: a wide image becomes 4 tiles and
    a thumbnail, and the prompt its slots (5 x N + a row end)."""
    wide = {"question": "What colour?", "choices": ["red"], "image": Image.new("RGB", (256, 64), "red")}
    harness = TokenFlexLMMs(model, N, num_tiles=4)
    harness.task_dict = {TASK: {SPLIT: [wide]}}
    request = Instance("loglikelihood", (wide["question"], " red", doc_to_visual, 0, TASK, SPLIT), idx=0,
                       metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    with ForwardCounter(model.vision_tower) as vision:
        harness.loglikelihood([request])
    assert vision.calls == [5]
    with pytest.raises(ValueError, match="num_tiles=0 must be >= 1"):
        TokenFlexLMMs(model, N, num_tiles=0)


@pytest.fixture(scope="module")
def noise_documents():
    """Four noise images (a plain colour looks the same at every N) and a text-only question."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    return [{"question": "What is in the image?", "image": image} for image in images] + [DOCUMENTS[1]]


def noise_answers(model, documents, num_vision_tokens, **model_args):
    """generate_until's answers to the documents in one batch, and the throughput metrics it logged."""
    harness = TokenFlexLMMs(model, num_vision_tokens, batch_size=len(documents), **model_args)
    harness.task_dict = {TASK: {SPLIT: documents}}
    requests = [Instance("generate_until", (doc["question"], {"max_new_tokens": 4, "until": ["\n\n"]}, doc_to_visual,
                                            doc_id, TASK, SPLIT), idx=0,
                         metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
                for doc_id, doc in enumerate(documents)]
    reset_logged_metrics()
    return harness.generate_until(requests), get_logged_metrics_history()[0]


def test_adaptive_answers_as_the_fixed_count_it_stops_at(chatty, noise_documents):
    """Threshold 0 stops every image at the ladder's first count, infinity at its last; either way
    the batch's four images are encoded once, and the throughput metrics say where it stopped."""
    fixed = {n: noise_answers(chatty, noise_documents, n)[0] for n in (16, 64)}
    assert fixed[16] != fixed[64]  # the answers tell the two counts apart
    for threshold, stop, tries in ((0.0, 16, 1), (math.inf, 64, 2)):
        with ForwardCounter(chatty.vision_tower) as vision:
            answers, metrics = noise_answers(chatty, noise_documents, "adaptive", threshold=threshold, ladder="16-64")
        assert vision.calls == [4]
        assert answers == fixed[stop]
        assert metrics["num_vision_tokens"] == "adaptive" and metrics["threshold"] == threshold
        assert metrics["mean_vision_tokens"] == stop and metrics["tries_per_image"] == tries
        assert metrics["prefill_total_s"] > 0


def test_adaptive_refuses_log_likelihood_requests_and_needs_a_threshold(model):
    with pytest.raises(NotImplementedError, match="generate_until requests only"):
        TokenFlexLMMs(model, "adaptive", threshold=0.5).loglikelihood(choice_requests())
    with pytest.raises(ValueError, match="num_vision_tokens=adaptive needs threshold="):
        TokenFlexLMMs(model, "adaptive")
    with pytest.raises(ValueError, match="threshold= needs num_vision_tokens=adaptive"):
        TokenFlexLMMs(model, 64, threshold=0.5)
    with pytest.raises(ValueError, match="joined by '-'"):
        TokenFlexLMMs(model, "adaptive", threshold=0.5, ladder="16,64")
    with pytest.raises(ValueError, match="increasing"):
        TokenFlexLMMs(model, "adaptive", threshold=0.5, ladder="64-16")


@pytest.mark.parametrize("tokens", [0, "0", -4, 15])
def test_model_refuses_a_token_count_that_is_not_a_positive_square(model, model_dir, tokens):
    message = f"num_vision_tokens={int(tokens)} is not a perfect square"
    with pytest.raises(ValueError, match=message):
        TokenFlexLMMs(model, tokens)
    with pytest.raises(ValueError, match=message):  # a folder is checked before its weights load
        TokenFlexLMMs(str(model_dir), tokens)


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                             ("float32", torch.float32), ("fp16", torch.float16)])
def test_model_args_take_every_dtype_spelling_the_tools_take(model_dir, dtype, expected):
    parser = argparse.ArgumentParser()
    add_placement_options(parser)
    assert parser.parse_args(["--dtype", dtype]).dtype == dtype  # the tools' --dtype takes it too
    assert TokenFlexLMMs(str(model_dir), N, device="cpu", dtype=dtype).model.dtype == expected


@pytest.mark.parametrize("local_rank, visible, expected", [(3, 1, "cuda:0"), (3, 8, "cuda:3"), (0, 2, "cuda:0")])
def test_default_device_is_the_gpu_this_task_sees(monkeypatch, local_rank, visible, expected):
    """Under Slurm's per-task GPU binding every task sees its one GPU as cuda:0, whatever its local
    rank; with all of a node's GPUs visible, each process takes its local rank's. (The GPU count is
    patched: these machines have none.)"""
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert default_device() == expected
