"""ZeRO-3 checkpoints of 2-rank runs -> model folders, and clear errors for checkpoints that can't convert.

The stage-1 run is the shared session fixture; one short stage-2 run from its final/ folder is
launched here (module fixture) so that the handover and a fine-tuned LM are covered too.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors import safe_open
from transformers import AutoImageProcessor

from pipeline.export.convert import ConversionError, bf16_tolerance, probe_logits, verify_folder
from pipeline.model.chat import load_tokenizer
from pipeline.model.folder import read_vlm_config
from pipeline.model.vlm import TokenFlexVLM
from tests.distributed import REPO, run_training
from tools import convert_checkpoint as convert_tool
from tools.demo import cpu_training_env

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stage2_run(stage1_run, synthetic_shards, tmp_path_factory):
    """A 3-step 2-rank stage-2 (finetune) run that starts from stage 1's exported folder."""
    out = tmp_path_factory.mktemp("stage2") / "run"
    result = run_training("tiny_cpu_stage2.yaml", out, f"model.init_from={stage1_run / 'final'}",
                          f"data.shards={synthetic_shards}", "train.max_steps=3", "train.save_every=3",
                          "data.seq_len=512")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def checkpoints_copy(stage1_run, tmp_path):
    """A scratch copy of the stage-1 checkpoints folder, to break."""
    return shutil.copytree(stage1_run / "checkpoints", tmp_path / "checkpoints")


def engine_logits(ckpt_dir):
    """Probe logits of the model the checkpoint holds: DeepSpeed's consolidated state dict,
    loaded into a model of the recorded structure, independently of the converter."""
    structure = ckpt_dir / "model"
    model = TokenFlexVLM.from_config(read_vlm_config(structure), load_tokenizer(structure),
                                     AutoImageProcessor.from_pretrained(structure))
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir)))
    return probe_logits(model)


def convert(*argv):
    return convert_tool.main([str(a) for a in argv])


@pytest.mark.parametrize("stage", ["stage1_run", "stage2_run"])
def test_converted_folder_has_the_checkpoints_logits(stage, request, tmp_path):
    run = request.getfixturevalue(stage)
    assert convert(run / "checkpoints", tmp_path / "model") == 0  # verifies the folder itself, too
    logits = probe_logits(TokenFlexVLM.from_pretrained(tmp_path / "model"))
    assert torch.equal(logits, engine_logits(run / "checkpoints"))
    # the folder training exported at the end is the same model
    assert torch.equal(logits, probe_logits(TokenFlexVLM.from_pretrained(run / "final")))


def test_stage2_starts_from_stage1_and_changes_the_lm(stage1_run, stage2_run, tmp_path):
    assert convert(stage2_run, tmp_path / "model") == 0  # a run's output_dir works as well
    stage1 = TokenFlexVLM.from_pretrained(stage1_run / "final").state_dict()
    stage2 = TokenFlexVLM.from_pretrained(tmp_path / "model").state_dict()
    assert stage1.keys() == stage2.keys()
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(stage1[name], stage2[name]), "finetuning should have changed the LM"
    assert (stage1[name] - stage2[name]).abs().max() < 0.1, "stage 2 should start from stage 1's weights"


def test_bf16_folder_is_within_one_bf16_step(stage1_run, tmp_path):
    assert convert(stage1_run, tmp_path / "bf16", "--dtype", "bf16") == 0
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    expected = engine_logits(stage1_run / "checkpoints")
    actual = probe_logits(TokenFlexVLM.from_pretrained(tmp_path / "bf16"))
    assert not torch.equal(actual, expected), "bf16 weights should round the logits"
    torch.testing.assert_close(actual, expected, **bf16_tolerance(expected))


def test_tag_sharding_and_step_folder(stage1_run, tmp_path):
    ckpt = stage1_run / "checkpoints"
    assert convert(ckpt, tmp_path / "sharded", "--tag", "step-000012", "--max-shard-size", "200KB") == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert convert(ckpt / "step-000012", tmp_path / "whole", "--no-verify") == 0
    older = probe_logits(TokenFlexVLM.from_pretrained(tmp_path / "sharded"))
    assert torch.equal(older, probe_logits(TokenFlexVLM.from_pretrained(tmp_path / "whole")))
    assert not torch.equal(older, probe_logits(TokenFlexVLM.from_pretrained(stage1_run / "final")))


def test_verification_catches_a_folder_with_other_weights(stage1_run, tmp_path):
    ckpt = stage1_run / "checkpoints"
    assert convert(ckpt, tmp_path / "model", "--no-verify") == 0
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    state_dict["projector.down.weight"] = state_dict["projector.down.weight"] * 1.001
    with pytest.raises(ConversionError, match="logits differ"):
        verify_folder(tmp_path / "model", ckpt / "model", state_dict)


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def replace_with_empty_archive(path):
    torch.save({}, path)  # a readable file that is not a DeepSpeed model state


BREAKAGES = {
    "missing model file": (lambda d: os.remove(d / "step-000016" / "zero_pp_rank_1_mp_rank_00_model_states.pt"),
                           ["incomplete", "2 ranks", "zero_pp_rank_1_mp_rank_00_model_states.pt is missing"]),
    "missing optimizer file": (lambda d: os.remove(d / "step-000016" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                               ["incomplete", "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing", "--tag"]),
    "missing latest": (lambda d: os.remove(d / "latest"), ["latest is missing", "--tag", "step-000012, step-000016"]),
    "truncated file": (lambda d: truncate(d / "step-000016" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                       ["zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated or corrupted", "step-000012"]),
    "wrong contents": (lambda d: replace_with_empty_archive(
                           d / "step-000016" / "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                       ["DeepSpeed could not consolidate", "is not a model state checkpoint", "--tag"]),
    "foreign model type": (lambda d: (d / "model" / "config.json").write_text('{"model_type": "llava"}'),
                           ["another project", "'llava'", "tokenflex_vlm"]),
    "no model structure": (lambda d: shutil.rmtree(d / "model"),
                           ["not a TokenFLEX checkpoints folder", "config.json is missing"]),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_checkpoints_give_clear_errors(breakage, checkpoints_copy, tmp_path, capsys):
    breaking, phrases = BREAKAGES[breakage]
    breaking(checkpoints_copy)
    assert convert(checkpoints_copy, tmp_path / "out") == 2
    message = capsys.readouterr().err
    for phrase in phrases:
        assert phrase in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_unknown_tag_names_the_available_ones(checkpoints_copy, tmp_path, capsys):
    assert convert(checkpoints_copy, tmp_path / "out", "--tag", "step-000099") == 2
    assert "step-000099 does not exist; available: step-000012, step-000016" in capsys.readouterr().err


def test_cli_error_has_no_traceback_and_exit_code_2(checkpoints_copy, tmp_path):
    os.remove(checkpoints_copy / "step-000016" / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    result = subprocess.run([sys.executable, "-m", "tools.convert_checkpoint", str(checkpoints_copy),
                             str(tmp_path / "out")], cwd=REPO, env=cpu_training_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert "error: checkpoint" in result.stderr and "is incomplete" in result.stderr
    assert "Traceback" not in result.stderr
