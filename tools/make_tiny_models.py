"""Write tiny models of real architectures, loadable with transformers' from_pretrained.

    OUT/vision   SigLIP vision tower (64 px, 4 px patches -> 16x16 grid) + its image processor,
                 pretrained for about a minute on generated scenes to tell each patch's colour and
                 kind of object (tools/pretrain_vision.py; its figures in pretraining.json);
                 --vision-pretrain-steps 0 leaves it random-init
    OUT/qwen2    Qwen2 causal LM + a Qwen2-Instruct-style tokenizer: ChatML's tokens in its own
                 vocabulary, Qwen's chat template, no BOS, EOS <|im_end|>
    OUT/llama    Llama causal LM + a Llama-3-Instruct-style tokenizer: <|begin_of_text|> (BOS,
                 added by the tokenizer), the header tokens, EOS <|eot_id|>, Meta's chat template
    OUT/base     Llama causal LM + a base tokenizer (Llama-2 style: BOS <s> added, EOS </s>, no chat template)

The LMs are random-init. The three tokenizers share one sentencepiece BPE model trained here on
generated text, so nothing is downloaded. Tests and the demo start from these folders exactly as
users start from real ones: like the real checkpoints, the Qwen2 LM has a spare embedding row for
the image marker and the others none.
"""

import argparse
import io
import json
import random
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import (
    AddedToken,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tools.pretrain_vision import STEPS as VISION_PRETRAIN_STEPS
from tools.pretrain_vision import pretrain_vision_tower, write_report

IMAGE_SIZE = 64
PATCH_SIZE = 4
VOCAB_SIZE = 768

WORDS = (
    "what is the colour of background shape largest smallest small big how many shapes are there "
    "in image picture circle square triangle red green blue yellow orange purple white black grey "
    "pink brown cyan gray lime navy magenta olive dot digit letter number count answer question "
    "which written tiny object plus minus equals one two three four five six seven eight nine "
    "zero and of a an to it this that with word capital city first last describe left right top "
    "bottom colour? shape? many? is? yes no"
).split()


def tokenizer_corpus(seed=0, lines=4000):
    """Short sentences over the synthetic data's vocabulary, plus every digit, letter and number."""
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines)]
    corpus += [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]
    corpus += [" ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")]
    return corpus


# The families' own chat templates (without generation marks, as they ship).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_tokenizer(out_dir, seed=0):
    """A base tokenizer (Llama-2 style) from a sentencepiece BPE model trained on tokenizer_corpus."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(seed)), model_writer=model, vocab_size=VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True)  # converts tokenizer.model


def family_tokenizer(base_dir, special_tokens, template, **tokens):
    """The base tokenizer with a family's special tokens in its vocabulary and its chat template."""
    tokenizer = LlamaTokenizer.from_pretrained(base_dir, add_bos_token=False)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens], special_tokens=True)
    for name, value in tokens.items():
        setattr(tokenizer, name, value)
    tokenizer.chat_template = template
    return tokenizer


def tokenizers(out_dir, seed=0):
    """{folder name: tokenizer} for the three LM folders."""
    base = train_tokenizer(out_dir, seed)
    qwen2 = family_tokenizer(out_dir, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN2_TEMPLATE,
                             bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    llama3 = family_tokenizer(out_dir, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                        "<|end_header_id|>", "<|eot_id|>"], LLAMA3_TEMPLATE,
                              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None)
    llama3.add_bos_token = True  # as Llama 3's tokenizer does: BOS before any encoded text
    return {"qwen2": qwen2, "llama": llama3, "base": base}


def lm_config_kwargs(vocab_size):
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                tie_word_embeddings=True)


def make_tiny_models(out, seed=0, vision_pretrain_steps=VISION_PRETRAIN_STEPS):
    """OUT/vision, qwen2, llama, base and tokenizer; vision_pretrain_steps 0: a random-init tower.
    The same seed gives the same files' weights; the LMs do not depend on the tower's pretraining."""
    out = Path(out)
    torch.manual_seed(seed)
    vision_config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    tower = SiglipVisionModel(vision_config)
    processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if vision_pretrain_steps:
        # (it leaves torch's random state as it was: the LMs below are what they were before it)
        report = pretrain_vision_tower(tower, processor, steps=vision_pretrain_steps, seed=seed)
    tower.save_pretrained(out / "vision")
    processor.save_pretrained(out / "vision")
    if vision_pretrain_steps:
        write_report(report, out / "vision")

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
               "base": (LlamaConfig, LlamaForCausalLM)}
    for name, tokenizer in tokenizers(out / "tokenizer", seed).items():
        config_class, model_class = classes[name]
        # Qwen2's embedding table has spare rows (151,936 for 151,646 tokens), so the image marker
        # takes one without a resize; Llama's fit exactly. One spare row here: a random LM would
        # otherwise greedily predict rows that are no token at all.
        vocab_size = len(tokenizer) + (name == "qwen2")
        config = config_class(**lm_config_kwargs(vocab_size), pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model_class(config).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write vision/, qwen2/, llama/, base/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-pretrain-steps", type=int, default=VISION_PRETRAIN_STEPS,
                        help=f"steps of the vision tower's pretraining (default: {VISION_PRETRAIN_STEPS}; "
                             "0: random init)")
    args = parser.parse_args(argv)
    if args.vision_pretrain_steps < 0:
        parser.error("--vision-pretrain-steps must be >= 0")
    make_tiny_models(args.out, args.seed, args.vision_pretrain_steps)
    pretrained = args.vision_pretrain_steps and json.loads((args.out / "vision" / "pretraining.json").read_text())
    tower = (f"pretrained {args.vision_pretrain_steps} steps in {pretrained['seconds']} s, held-out patches' colour "
             f"{pretrained['held_out']['colour_accuracy']:.3f}, kind {pretrained['held_out']['kind_accuracy']:.3f}"
             if pretrained else "random-init")
    print(f"tiny models written to {args.out}: vision/ ({IMAGE_SIZE}px, {IMAGE_SIZE // PATCH_SIZE}x"
          f"{IMAGE_SIZE // PATCH_SIZE} patches, {tower}), qwen2/, llama/, base/ (random-init)")


if __name__ == "__main__":
    main()
