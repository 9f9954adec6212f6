"""Typed configs: every shipped YAML loads, overrides apply, bad keys and values are named, every
key is documented."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.run.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    assert isinstance(load_config(REPO / "configs" / name), Config)


def test_dotted_overrides_are_typed():
    cfg = load_config(REPO / "configs/stage1_align.yaml",
                      ["train.max_steps=7", "optim.lr=1e-4", "tokens.counts={144: 1}", "wandb.mode=disabled"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-4 and cfg.tokens.counts == {144: 1}
    assert cfg.wandb.mode == "disabled"


@pytest.mark.parametrize("override, named", [
    ("optim.lrr=1", "optim.lrr"),
    ("trian.max_steps=3", "trian"),
    ("train.max_steps=abc", "train.max_steps"),
    ("data.seq_len=-5", "seq_len"),
    ("tokens.counts={50: 1}", "50"),
    ("wandb.mode=loud", "wandb.mode"),
    ("model.attn_implementation=flash", "model.attn_implementation"),
    ("train.collective_timeout_minutes=0", "train.collective_timeout_minutes"),
    ("train.max_steps", "section.key=value"),
])
def test_bad_keys_and_values_are_named(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config(REPO / "configs/stage1_align.yaml", [override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_help_documents_every_key():
    """--help gives every key of every section with its type, default and the documentation below its field."""
    from pipeline.run.config import describe_options

    lines = describe_options()
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(section.type):
            entry = next(i for i, line in enumerate(lines) if line.startswith(f"  {section.name}.{key.name} ("))
            assert "default" in lines[entry] and lines[entry + 1].startswith("      ") and lines[entry + 1].strip(), \
                f"{section.name}.{key.name} has no documentation"


def test_unknown_stage_is_named_before_start_up():
    from pipeline.train.preflight import check_inputs

    with pytest.raises(ValueError, match=r"train\.stage must be one of align, finetune, got 'pretrain'"):
        check_inputs(load_config(REPO / "configs/stage1_align.yaml", ["train.stage=pretrain"]))


def test_cli_help_lists_options_and_bad_config_exits_2():
    help_text = subprocess.run([sys.executable, "-m", "pipeline.train", "--help"], cwd=REPO,
                               capture_output=True, text=True).stdout
    assert "tokens.counts" in help_text and "train.output_dir" in help_text
    bad = subprocess.run([sys.executable, "-m", "pipeline.train", "configs/stage1_align.yaml", "optim.lrr=1"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown config key optim.lrr" in bad.stderr


@pytest.mark.parametrize("override, named", [
    ("model.vision_path=/no/such/vision", "model.vision_path='/no/such/vision' not found"),
    ("data.shards=/no/such/shards", "data.shards: /no/such/shards not found"),
    ("train.deepspeed=/no/such.json", "train.deepspeed='/no/such.json' not found"),
])
def test_missing_inputs_are_named_before_start_up(tiny_models, synthetic_shards, override, named):
    from pipeline.train.preflight import check_inputs

    cfg = load_config(REPO / "configs/tiny_cpu_stage1.yaml",
                      [f"model.vision_path={tiny_models / 'vision'}", f"model.lm_path={tiny_models / 'qwen2'}",
                       f"data.shards={synthetic_shards}", f"train.deepspeed={REPO / 'configs/zero3.json'}", override])
    with pytest.raises(FileNotFoundError, match=re.escape(named)):
        check_inputs(cfg)
