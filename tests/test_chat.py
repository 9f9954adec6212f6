"""pipeline/model/chat.py: each LM family's conversation format, its label mask, BOS, vocabulary and end token."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from pipeline.model.chat import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    end_token_ids,
    load_tokenizer,
    prepare_tokenizer,
    prompt_ids,
    saved_chat_format,
    tokenize_record,
)
from pipeline.model.vlm import TokenFlexVLM

RECORD = {"conversations": [
    {"from": "human", "value": f"{IMAGE_TOKEN}\nwhat is the colour of the shape?"},
    {"from": "gpt", "value": "red circle"},
    {"from": "human", "value": "how many shapes are there?"},
    {"from": "gpt", "value": "two"},
]}
# folder from tools.make_tiny_models: (format chosen automatically, BOS it must start with, reply end token)
FAMILIES = {"qwen2": ("chatml", None, "<|im_end|>"),
            "llama": ("llama3", "<|begin_of_text|>", "<|eot_id|>"),
            "base": ("plain", "<s>", "</s>")}


def supervised_spans(ids, labels):
    spans = []
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            assert label == ids[i]
            if spans and spans[-1][-1] == i - 1:
                spans[-1].append(i)
            else:
                spans.append([i])
    return [[ids[i] for i in span] for span in spans]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gets_its_own_format(tiny_models, family):
    chat_format, bos, end = FAMILIES[family]
    own = PreTrainedTokenizerFast.from_pretrained(tiny_models / family)
    tokenizer = load_tokenizer(tiny_models / family)
    assert saved_chat_format(tokenizer) == chat_format
    # Nothing but the image marker joins the vocabulary: the format uses the LM's own tokens.
    assert set(tokenizer.get_vocab()) - set(own.get_vocab()) == {IMAGE_TOKEN}

    ids, labels = tokenize_record(RECORD, tokenizer, num_images=1)
    replies = [turn["value"] for turn in RECORD["conversations"][1::2]]
    assert [tokenizer.decode(span) for span in supervised_spans(ids, labels)] == [r + end for r in replies]
    if bos is None:
        assert tokenizer.bos_token_id is None or tokenizer.bos_token_id not in ids
    else:
        assert ids[0] == tokenizer.convert_tokens_to_ids(bos) and ids.count(ids[0]) == 1
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    # The prompt for generation is the conversation up to the last reply, token for token.
    prompt = prompt_ids(RECORD, tokenizer)
    assert ids[:len(prompt)] == prompt and tokenizer.decode(ids[len(prompt):]).startswith(replies[-1])
    assert end_token_ids(tokenizer)[0] == tokenizer.convert_tokens_to_ids(end)


def test_format_can_be_chosen_and_must_fit_the_vocabulary(tiny_models):
    tokenizer = load_tokenizer(tiny_models / "qwen2", chat_format="plain")
    assert saved_chat_format(tokenizer) == "plain"
    ids, labels = tokenize_record(RECORD, tokenizer, num_images=1)
    assert "<|im_start|>" not in tokenizer.decode(ids)
    with pytest.raises(ValueError, match=r"model.chat_format=llama3: .* lacks \['<\|begin_of_text\|>'"):
        load_tokenizer(tiny_models / "qwen2", chat_format="llama3")
    with pytest.raises(ValueError, match="model.chat_format='vicuna' is not one of"):
        load_tokenizer(tiny_models / "qwen2", chat_format="vicuna")


def test_a_template_of_an_unknown_family_asks_for_a_format(tiny_models):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_models / "base")
    tokenizer.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    with pytest.raises(ValueError, match="set model.chat_format"):
        prepare_tokenizer(tokenizer)
    prepare_tokenizer(tokenizer, "plain")
    assert saved_chat_format(tokenizer) == "plain"


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_folders_keep_their_format_and_stop_at_its_end_token(tiny_models, tmp_path, family):
    chat_format, _, end = FAMILIES[family]
    model = TokenFlexVLM.from_components(tiny_models / "vision", tiny_models / family)
    model.save_pretrained(tmp_path)
    loaded = TokenFlexVLM.from_pretrained(tmp_path)
    assert saved_chat_format(loaded.tokenizer) == chat_format
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    end_id = model.tokenizer.convert_tokens_to_ids(end)
    saved = json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
    assert end_id in (saved if isinstance(saved, list) else [saved])
    assert end_id in loaded.generation_config().eos_token_id
    # A stage-2 style re-preparation with auto keeps the saved format.
    prepare_tokenizer(loaded.tokenizer)
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template
