"""Write tiny random-init models of real architectures, loadable with transformers' from_pretrained.

    OUT/vision   SigLIP vision tower (64 px, 4 px patches -> 16x16 grid) + its image processor
    OUT/qwen2    Qwen2 causal LM + tokenizer
    OUT/llama    Llama causal LM + the same tokenizer

The tokenizer is a sentencepiece BPE model trained here on generated text, so nothing is
downloaded. Tests and the demo start from these folders exactly as users start from real ones.
"""

import argparse
import io
import random
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from pipeline.tokens import prepare_tokenizer

IMAGE_SIZE = 64
PATCH_SIZE = 4
VOCAB_SIZE = 768

WORDS = (
    "what is the colour of background shape largest smallest small big how many shapes are there "
    "in image picture circle square triangle red green blue yellow orange purple white black grey "
    "pink brown cyan digit letter number count answer question which written tiny object plus minus "
    "equals one two three four five six seven eight nine zero and of a an to it this that with word "
    "capital city first last describe left right top bottom colour? shape? many? is? yes no"
).split()


def tokenizer_corpus(seed=0, lines=4000):
    """Short sentences over the synthetic data's vocabulary, plus every digit, letter and number."""
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines)]
    corpus += [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]
    corpus += [" ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")]
    return corpus


def train_tokenizer(out_dir, seed=0):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(seed)), model_writer=model, vocab_size=VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=False)  # converts tokenizer.model
    prepare_tokenizer(tokenizer)
    tokenizer.eos_token = "<|im_end|>"  # chat turns end there, so generation stops there
    return tokenizer


def lm_config_kwargs(vocab_size):
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                tie_word_embeddings=True)


def make_tiny_models(out, seed=0):
    out = Path(out)
    torch.manual_seed(seed)
    vision_config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    SiglipVisionModel(vision_config).save_pretrained(out / "vision")
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out / "vision")

    tokenizer = train_tokenizer(out / "tokenizer", seed)
    for name, config_class, model_class in [("qwen2", Qwen2Config, Qwen2ForCausalLM),
                                            ("llama", LlamaConfig, LlamaForCausalLM)]:
        config = config_class(**lm_config_kwargs(len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
        model_class(config).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write vision/, qwen2/, llama/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_tiny_models(args.out, args.seed)
    print(f"tiny models written to {args.out}: vision/ ({IMAGE_SIZE}px, {IMAGE_SIZE // PATCH_SIZE}x"
          f"{IMAGE_SIZE // PATCH_SIZE} patches), qwen2/, llama/")


if __name__ == "__main__":
    main()
