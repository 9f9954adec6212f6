"""Text-side conventions shared by the model, the data pipeline and the tools.

A conversation carries one IMAGE_TOKEN per image. Just before the LM sees it, each marker
is expanded into N copies (the step's vision-token count); the projector's N outputs fill
those slots in order.
"""

from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

# ChatML, with {% generation %} tags so that apply_chat_template(return_assistant_tokens_mask=True)
# marks exactly the assistant replies (content plus their <|im_end|>) as trainable.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]


def expand_image_markers(input_ids, labels, image_token_id, num_vision_tokens):
    """Replace every image marker with `num_vision_tokens` copies; image slots never train."""
    out_ids, out_labels = [], []
    for token, label in zip(input_ids, labels):
        if token == image_token_id:
            out_ids.extend([image_token_id] * num_vision_tokens)
            out_labels.extend([IGNORE_INDEX] * num_vision_tokens)
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


def prepare_tokenizer(tokenizer):
    """Give any HF tokenizer the project's image marker, chat template and a pad token.

    Idempotent, so a tokenizer saved with a VLM comes back unchanged.
    """
    missing = [t for t in [IMAGE_TOKEN, *CHAT_SPECIAL_TOKENS] if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(path):
    """Load a tokenizer from its tokenizer.json, whatever model folder it sits in.

    AutoTokenizer picks the class from the folder's model_type, which would re-tokenize a
    sentencepiece vocabulary in a Qwen2 folder as byte-level BPE; tokenizer.json is the truth.
    """
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    return tokenizer
