"""Shared fixtures: tiny real models built once per test session (nothing is downloaded)."""

import warnings

import pytest
import torch

from tools.make_tiny_models import make_tiny_models

# torch 2.13 warns on every gloo collective; the tests look at results, not at these
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folder with vision/, qwen2/ and llama/ tiny random-init checkpoints."""
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Shards of 240 synthetic records (about 10% text-only), 40 per shard."""
    from tools import build_shards, make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic.main(["--out", str(root / "raw"), "--n", "240", "--seed", "3"])
    build_shards.build(str(root / "raw" / "data.json"), str(root / "raw"), str(root / "shards"), samples_per_shard=40)
    return root / "shards"


@pytest.fixture(scope="session")
def stage1_run(tiny_models, synthetic_shards, tmp_path_factory):
    """A finished 2-rank ZeRO-3 stage-1 run (16 steps, checkpoints every 4, exported final/)."""
    from tests.distributed import run_training, stage1_overrides

    out = tmp_path_factory.mktemp("stage1") / "run"
    result = run_training("tiny_cpu_stage1.yaml", out, *stage1_overrides(tiny_models, synthetic_shards))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def save_chatty_copy(model_dir, out):
    """Save model_dir's model with the embeddings of the newline and the special tokens zeroed.
    The barely trained tiny LM answers only newlines or special tokens (empty once stripped, or
    ended at once by the chat format's end token); the copy gives visible answers."""
    from pipeline.model import TokenFlexVLM

    chatty = TokenFlexVLM.from_pretrained(model_dir)
    with torch.no_grad():
        for token in ["<0x0A>", *chatty.tokenizer.all_special_tokens]:
            chatty.language_model.get_input_embeddings().weight[chatty.tokenizer.convert_tokens_to_ids(token)] = 0
    chatty.save_pretrained(out)
    return out
