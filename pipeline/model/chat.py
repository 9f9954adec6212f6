"""Conversation formats per LM family, the image marker and label masks.

A conversation carries one IMAGE_TOKEN per image, in the order of its images. Just before the LM
sees it, each marker is expanded into its image's slots: N copies (the step's vision-token count)
per tile, plus row ends (pipeline/model/tiles.py); the image's tiles, projected, fill those slots in order.

Each LM family gets its own conversation format (model.chat_format; `auto` picks it):
  chatml  tokenizers with a chat template and <|im_start|>/<|im_end|> in their vocabulary
          (Qwen2): <|im_start|>role\\n ... <|im_end|>\\n; a reply ends at <|im_end|>
  llama3  tokenizers with a chat template and Llama 3's header tokens: <|begin_of_text|>, then
          <|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>; a reply ends at <|eot_id|>
  plain   a base LM whose tokenizer has no chat template: BOS when the tokenizer adds one itself,
          each user turn then a newline, each reply then EOS. Only the LM's own tokens.
Every format marks the replies with {% generation %}, so apply_chat_template(
return_assistant_tokens_mask=True) labels exactly each reply plus its end token. The only token
ever added to a vocabulary is IMAGE_TOKEN. The format is stored as the tokenizer's chat_template
(its first line names it), so a saved model folder keeps it.
"""

import re
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}  # LLaVA's turn names

CHATML = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{ message['content'] + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PLAIN = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- else %}"
    "{{ message['content'] + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)
# name: (template, tokens it needs in the vocabulary, the token that ends a reply; None: EOS)
FORMATS = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "plain": (PLAIN, [], None),
}
CHAT_FORMATS = ("auto", *FORMATS)
TAG = "{#- tokenflex chat format: %s #}"


def saved_chat_format(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The format named on the first line of the tokenizer's chat template, or None if it is not ours."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    match = re.match(re.escape(TAG).replace("%s", r"(\w+)"), template)
    return match.group(1) if match else None


def detect_chat_format(tokenizer: PreTrainedTokenizerBase) -> str:
    """The format of the LM family this tokenizer belongs to (see the module docstring)."""
    if tokenizer.chat_template is None:
        return "plain"
    vocab = tokenizer.get_vocab()
    for name in ("chatml", "llama3"):
        if all(token in vocab for token in FORMATS[name][1]):
            return name
    raise ValueError(f"{tokenizer.name_or_path}: its chat template belongs to an LM family without a format here; "
                     f"set model.chat_format to one of {list(FORMATS)} (plain works with any tokenizer)")


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_format: str = "auto") -> None:
    """Give an HF tokenizer the image marker, a chat format and a pad token.

    chat_format "auto" keeps a format the tokenizer was saved with, else detects the LM's own.
    Idempotent, so a tokenizer saved with a VLM comes back unchanged.
    """
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"model.chat_format={chat_format!r} is not one of {list(CHAT_FORMATS)}")
    name = chat_format if chat_format != "auto" else saved_chat_format(tokenizer) or detect_chat_format(tokenizer)
    template, needed, end = FORMATS[name]
    if end is None and tokenizer.eos_token is None:
        raise ValueError(
            f"model.chat_format={name}: tokenizer {tokenizer.name_or_path} has no EOS token to end replies"
        )
    missing = [token for token in needed + [end or tokenizer.eos_token] if token not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"model.chat_format={name}: tokenizer {tokenizer.name_or_path} lacks {missing}; "
                         f"choose a format of its own family (or auto)")
    if name == "plain" and adds_bos(tokenizer):
        template = "{{ bos_token }}" + template
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = TAG % name + template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = end or tokenizer.eos_token


def end_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a reply: the format's end token, and EOS when that differs."""
    end = FORMATS[saved_chat_format(tokenizer)][2]
    ids = [tokenizer.convert_tokens_to_ids(end)] if end else []
    return ids + [i for i in [tokenizer.eos_token_id] if i is not None and i not in ids]


def load_tokenizer(path: str | Path, chat_format: str = "auto") -> PreTrainedTokenizerFast:
    """Load a tokenizer from its tokenizer.json, whatever model folder it sits in, and prepare it.

    AutoTokenizer picks the class from the folder's model_type, which would re-tokenize a
    sentencepiece vocabulary in a Qwen2 folder as byte-level BPE; tokenizer.json is the truth.
    """
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    prepare_tokenizer(tokenizer, chat_format)
    return tokenizer


def expand_image_markers(input_ids: list[int], labels: list[int], image_token_id: int,
                         slots_per_image: int | Sequence[int]) -> tuple[list[int], list[int]]:
    """Replace the k-th image marker with slots_per_image[k] copies (pipeline/model/tiles.py:
    image_slots; an int: every image's); image slots never train."""
    markers = input_ids.count(image_token_id)
    slots = [slots_per_image] * markers if isinstance(slots_per_image, int) else list(slots_per_image)
    if len(slots) != markers:
        raise ValueError(f"{markers} {IMAGE_TOKEN} markers but slot counts for {len(slots)} images")
    out_ids, out_labels, image = [], [], 0
    for token, label in zip(input_ids, labels):
        if token == image_token_id:
            out_ids.extend([image_token_id] * slots[image])
            out_labels.extend([IGNORE_INDEX] * slots[image])
            image += 1
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


def messages(record: dict, turns: int | None = None) -> list[dict[str, str]]:
    return [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"][:turns]]


def tokenize_record(record: dict, tokenizer: PreTrainedTokenizerBase, num_images: int,
                    key: str = "record") -> tuple[list[int], list[int]]:
    """input_ids and labels (the replies and their end tokens only) of a LLaVA record, one marker per image.

    Raises ValueError naming `key` when the number of markers doesn't match num_images.
    """
    encoded = tokenizer.apply_chat_template(messages(record), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    input_ids = list(encoded["input_ids"])
    labels = [t if m else IGNORE_INDEX for t, m in zip(input_ids, encoded["assistant_masks"])]
    markers = input_ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if markers != num_images:
        raise ValueError(f"{key}: {markers} {IMAGE_TOKEN} tokens but {num_images} images")
    return input_ids, labels


def prompt_ids(record: dict, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids up to and including the generation prompt of the record's last reply."""
    return list(tokenizer.apply_chat_template(messages(record, -1), tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])
