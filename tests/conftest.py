"""Shared fixtures: tiny real models built once per test session (nothing is downloaded)."""

import os
import warnings

import pytest
import torch

from tools.make_tiny_models import make_tiny_models

# torch 2.13 warns on every gloo collective; the tests look at results, not at these
warnings.filterwarnings("ignore", category=FutureWarning)


def require_lmms_eval():
    """Skip the calling test module when lmms-eval (requirements-eval.txt) is not installed, except
    in CI (CI=true), where the missing install fails instead."""
    try:
        import datasets  # noqa: F401
        import lmms_eval  # noqa: F401
    except ModuleNotFoundError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"lmms-eval is not installed ({error}): pip install --no-deps -r requirements-eval.txt",
                    allow_module_level=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folder with vision/, qwen2/ and llama/ tiny random-init checkpoints (the tower's minute of
    pretraining skipped: the tests need its shapes, not its sight; tests/test_pretrain_vision.py
    tests the pretraining)."""
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"), vision_pretrain_steps=0)


@pytest.fixture(scope="session")
def models(tiny_models):
    """The tiny Qwen2 tokenizer and the tiny vision tower's image processor."""
    from transformers import AutoImageProcessor

    from pipeline.model.chat import load_tokenizer

    return load_tokenizer(tiny_models / "qwen2"), AutoImageProcessor.from_pretrained(tiny_models / "vision")


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """300 synthetic records (raw/) in 8 shards of 40, the last one 20 (shards/)."""
    from tools import build_shards, make_synthetic

    root = tmp_path_factory.mktemp("synth")
    make_synthetic.main(["--out", str(root / "raw"), "--n", "300", "--seed", "7"])
    build_shards.build(str(root / "raw" / "data.json"), str(root / "raw"), str(root / "shards"), samples_per_shard=40)
    return root


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Shards of 240 synthetic records (about 10% text-only), 40 per shard."""
    from tools import build_shards, make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic.main(["--out", str(root / "raw"), "--n", "240", "--seed", "3"])
    build_shards.build(str(root / "raw" / "data.json"), str(root / "raw"), str(root / "shards"), samples_per_shard=40)
    return root / "shards"


@pytest.fixture(scope="session")
def tiled(tmp_path_factory):
    """120 synthetic records (raw/) for tiles, in shards of 20 (shards/): half of the image ones wide
    or tall, a third of them two-image."""
    from tools import build_shards, make_synthetic

    root = tmp_path_factory.mktemp("tiled")
    make_synthetic.main(["--out", str(root / "raw"), "--n", "120", "--seed", "5", "--wide-fraction", "0.5",
                         "--multi-image-fraction", "0.3"])
    build_shards.build(str(root / "raw" / "data.json"), str(root / "raw"), str(root / "shards"), samples_per_shard=20)
    return root


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """120 synthetic records (raw/), half of them clips of 16 frames (tools/synthetic_clips.py), the
    rest scenes and text-only questions, in shards of 20 (shards/)."""
    from tools import build_shards, make_synthetic

    root = tmp_path_factory.mktemp("clips")
    make_synthetic.main(["--out", str(root / "raw"), "--n", "120", "--seed", "9", "--video-fraction", "0.5"])
    build_shards.build(str(root / "raw" / "data.json"), str(root / "raw"), str(root / "shards"), samples_per_shard=20)
    return root


@pytest.fixture(scope="session")
def video_model(tiny_models, tmp_path_factory):
    """A random-init model folder that samples 4 frames per clip, made to answer visibly
    (save_chatty_copy)."""
    from pipeline.model.video import set_video_sampling
    from pipeline.model.vlm import TokenFlexVLM

    root = tmp_path_factory.mktemp("video_model")
    torch.manual_seed(0)
    model = TokenFlexVLM.from_components(tiny_models / "vision", tiny_models / "qwen2")
    set_video_sampling(model.image_processor, 4, 0.0)
    model.save_pretrained(root / "random")
    return save_chatty_copy(root / "random", root / "chatty")


LONG_PROMPT_WORDS = 600  # a prompt of these alone fills a 512-token row (data.seq_len in the stage-1 runs)


@pytest.fixture(scope="session")
def mixture(synthetic_shards, tmp_path_factory):
    """A mixture file of two sources: `synthetic` (synthetic_shards, repeat 1) and `hard` (60 more
    synthetic records in shards of 20, repeat 0.5: a seeded half of it each epoch), 8 of whose
    prompts are so long that their answers are truncated away and 2 of whose images are corrupt."""
    import json

    import webdataset as wds
    import yaml

    from tools import build_shards, make_synthetic

    root = tmp_path_factory.mktemp("mixture")
    make_synthetic.main(["--out", str(root / "raw"), "--n", "60", "--seed", "11", "--text-only-fraction", "0"])
    records = json.loads((root / "raw" / "data.json").read_text())
    for record in records[5::8]:
        first = record["conversations"][0]
        first["value"] = first["value"].replace("\n", "\n" + " ".join(["colour"] * LONG_PROMPT_WORDS) + " ", 1)
    (root / "raw" / "data.json").write_text(json.dumps(records))
    build_shards.build(str(root / "raw" / "data.json"), str(root / "raw"), str(root / "hard"), samples_per_shard=20)
    shard = root / "hard" / "shard-000001.tar"
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard)) as writer:
        for i, sample in enumerate(samples):
            if i in (3, 14):
                sample["png"] = b"\x89PNG corrupt"
            writer.write({k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")})
    path = root / "mixture.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"name": "synthetic", "shards": str(synthetic_shards), "repeat": 1},
                                                {"name": "hard", "shards": "hard", "repeat": 0.5}]}))
    return path


@pytest.fixture(scope="session")
def stage1_run(tiny_models, mixture, tmp_path_factory):
    """A finished 2-rank ZeRO-3 stage-1 run on the two-source mixture (16 steps, checkpoints every
    4, exported final/)."""
    from tests.distributed import run_training, stage1_overrides

    out = tmp_path_factory.mktemp("stage1") / "run"
    result = run_training("tiny_cpu_stage1.yaml", out, *stage1_overrides(tiny_models, mixture))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def save_chatty_copy(model_dir, out):
    """Save model_dir's model with the embeddings of the newline and the special tokens zeroed.
    The barely trained tiny LM answers only newlines or special tokens (empty once stripped, or
    ended at once by the chat format's end token); the copy gives visible answers."""
    from pipeline.model.vlm import TokenFlexVLM

    chatty = TokenFlexVLM.from_pretrained(model_dir)
    with torch.no_grad():
        for token in ["<0x0A>", *chatty.tokenizer.all_special_tokens]:
            chatty.language_model.get_input_embeddings().weight[chatty.tokenizer.convert_tokens_to_ids(token)] = 0
    chatty.save_pretrained(out)
    return out
