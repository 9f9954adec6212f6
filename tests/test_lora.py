"""LoRA in stage 2 (model.lora, stages/lora.py) on 2 CPU ranks under DeepSpeed ZeRO-3, and its conversion.

One LoRA run from stage 1's folder, through tests/record_dtypes.py (what each rank's engine holds):
adapters on the LM and the tower, the projector at its own learning rate, gradient checkpointing.
The same run, SIGKILLed and started again, replays it bitwise; a copy of it resumes on one rank.
A short bf16 run on tiled images. Start-up refusals are checked in-process.
"""

import json
import math
import signal
import subprocess
import time

import peft
import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file
from transformers import AutoModel

from pipeline.export.convert import (
    ConversionError,
    convert_checkpoint,
    merge_tolerance,
    probe_logits,
    verify_folder,
)
from pipeline.model.folder import read_vlm_config
from pipeline.model.vlm import TokenFlexVLM
from pipeline.run.config import load_config
from pipeline.train.preflight import check_inputs
from stages.lora import is_adapter, peft_config, read_record
from tests.distributed import REPO, metrics, run_training, torchrun_command
from tests.test_resume_world_size import cut_back
from tests.test_train import signal_workers
from tools.demo import cpu_training_env

pytestmark = pytest.mark.timeout(600)
CONFIG = "tiny_cpu_stage2_lora.yaml"
STEPS = 10
RATES = {"optim.lr": 1e-2, "optim.projector_lr": 3e-3, "optim.vision_lr": 2e-3}


def lora_overrides(stage1_run, shards):
    return [f"model.init_from={stage1_run / 'final'}", f"data.shards={shards}", f"train.max_steps={STEPS}",
            "train.save_every=4", "data.seq_len=512", "model.lora.vision=true", "train.gradient_checkpointing=true",
            *(f"{key}={rate}" for key, rate in RATES.items())]


@pytest.fixture(scope="module")
def lora_run(stage1_run, synthetic_shards, tmp_path_factory):
    """10 steps of stage 2 with adapters on the LM and the tower (rank 8), checkpoints at 4 and 8, final/."""
    out = tmp_path_factory.mktemp("lora") / "run"
    result = run_training(CONFIG, out, *lora_overrides(stage1_run, synthetic_shards), module="tests.record_dtypes")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def killed_and_resumed(stage1_run, synthetic_shards, tmp_path_factory):
    """lora_run's command, SIGKILLed once it has logged 6 steps (past its step-4 checkpoint), then
    started again. Returns the output folder and the checkpoint step it resumed from."""
    out = tmp_path_factory.mktemp("lora_resumed") / "run"
    command = torchrun_command(CONFIG, out, *lora_overrides(stage1_run, synthetic_shards), module="tests.record_dtypes")
    process = subprocess.Popen(command, cwd=REPO, env=cpu_training_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and '"step": 6,' in (out / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.time() < deadline, "first run ended before step 6"
        time.sleep(0.05)
    signal_workers(process, signal.SIGKILL)
    process.kill()
    process.wait()
    checkpoint_step = int((out / "checkpoints" / "latest").read_text().removeprefix("step-"))
    result = run_training(CONFIG, out, *lora_overrides(stage1_run, synthetic_shards), module="tests.record_dtypes")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, checkpoint_step


def engine_record(run, rank=0):
    return json.loads((run / "engine_dtypes" / f"rank-{rank}.json").read_text())


def lora_formula(config, rank, names, hidden, intermediate, heads, kv_heads=None):
    """r x (inputs + outputs) summed over the named linear layers of every transformer layer."""
    head_dim = config.get("head_dim") or hidden // heads
    kv = (kv_heads or heads) * head_dim
    sizes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
             "o_proj": (heads * head_dim, hidden), "out_proj": (hidden, hidden),
             "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
             "down_proj": (intermediate, hidden), "fc1": (hidden, intermediate), "fc2": (intermediate, hidden)}
    return config["num_hidden_layers"] * rank * sum(sum(sizes[name]) for name in names)


def reference_model(run):
    """The checkpoint's model, independently of the converter: stage 1's folder (the run's base),
    peft's LoRA layers injected as the run's config says, DeepSpeed's consolidated state dict loaded."""
    model = TokenFlexVLM.from_pretrained(read_record(run / "checkpoints" / "model").base)
    peft.inject_adapter_in_model(peft_config(load_config(run / "config.yaml").model.lora), model)
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints")))
    return model


# ---- training ----

def test_trainable_parameters_are_the_lora_formula(lora_run):
    """The log's trainable table and the engine agree with r x (inputs + outputs) over the targets;
    besides the adapters only the projector and the tile layout train."""
    structure = read_vlm_config(lora_run / "checkpoints" / "model")
    lora = load_config(lora_run / "config.yaml").model.lora
    text, vision = structure.text_config, structure.vision_config
    expected = {
        "language_model": lora_formula(text, lora.rank, lora.target_modules, text["hidden_size"],
                                       text["intermediate_size"], text["num_attention_heads"],
                                       text["num_key_value_heads"]),
        "vision_tower": lora_formula(vision, lora.rank, lora.vision_target_modules, vision["hidden_size"],
                                     vision["intermediate_size"], vision["num_attention_heads"])}
    log = (lora_run.parent / "run.log").read_text()
    for part, count in expected.items():
        assert f"  {part:<16} TRAINS {count:>12,} parameters in LoRA adapters" in log
        assert f"  {part:<16} frozen" in log
    parameters = engine_record(lora_run)["parameters"]
    trained = {name: p for name, p in parameters.items() if p["trains"]}
    for part, count in expected.items():
        assert sum(p["numel"] for name, p in trained.items() if name.startswith(part)) == count, part
        assert all(is_adapter(name) for name in trained if name.startswith(part)), part
    assert {name.split(".")[0] for name in trained} == {"language_model", "vision_tower", "projector", "tile_layout"}


def test_everything_but_adapters_projector_and_tile_layout_is_unchanged(lora_run, stage1_run):
    trained = get_fp32_state_dict_from_zero_checkpoint(str(lora_run / "checkpoints"))
    before = load_file(stage1_run / "final" / "model.safetensors")
    frozen = {name.replace(".base_layer.", "."): tensor for name, tensor in trained.items()
              if not is_adapter(name) and not name.startswith(("projector.", "tile_layout."))}
    assert frozen.keys() - before.keys() <= {"language_model.lm_head.weight"}  # tied: stored once in folders
    assert {name.split(".")[0] for name in before.keys() - frozen.keys()} == {"projector", "tile_layout"}
    for name, tensor in frozen.items():
        if name in before:
            assert torch.equal(tensor, before[name]), name
    assert not torch.equal(trained["projector.down.weight"], before["projector.down.weight"])
    lora_b = [name for name in trained if "lora_B" in name]
    assert {name.split(".")[0] for name in lora_b} == {"language_model", "vision_tower"}
    # lora_B starts at zero: where gradients reached, it moved (the tower's last layer feeds nothing:
    # the projector reads model.vision_feature_layer -2)
    moved = {name for name in lora_b if trained[name].abs().sum() > 0}
    assert {name.split(".")[0] for name in moved} == {"language_model", "vision_tower"}
    assert any("vision_tower.encoder.layers.0." in name for name in moved)


def test_loss_falls(lora_run):
    losses = [m["loss"] for m in metrics(lora_run)]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_per_part_learning_rates_reach_the_optimizer_groups(lora_run):
    """Each trained parameter's group in the engine's optimizer has its part's rate: the LM's adapters
    optim.lr, the tower's optim.vision_lr, the projector and the tile layout optim.projector_lr."""
    for rank in (0, 1):
        parameters = engine_record(lora_run, rank)["parameters"]
        rates = {}
        for name, p in parameters.items():
            part = name.split(".")[0]
            rates.setdefault(part if part in ("language_model", "vision_tower") else "image side", set()).add(p["lr"])
        assert rates == {"language_model": {None, RATES["optim.lr"]}, "vision_tower": {None, RATES["optim.vision_lr"]},
                         "image side": {RATES["optim.projector_lr"]}}, rank
    assert "gradient checkpointing on: Qwen2ForCausalLM, SiglipVisionModel" in (lora_run.parent / "run.log").read_text()


def test_adapters_are_partitioned_and_placed_by_deepspeed(lora_run):
    """Added after the load into partitions, the adapters come to the engine whole, as the projector
    does, and leave it partitioned over the 2 ranks on the engine's device."""
    for rank in (0, 1):
        parameters = engine_record(lora_run, rank)["parameters"]
        adapters = {name: p for name, p in parameters.items() if is_adapter(name)}
        assert adapters and not any(p["partitioned_at_build"] for p in adapters.values())
        assert all(p["held"] == math.ceil(p["numel"] / 2) and p["device"] == "cpu" for p in adapters.values())


def test_resume_after_sigkill_replays_bitwise(lora_run, killed_and_resumed):
    out, checkpoint_step = killed_and_resumed
    assert 4 <= checkpoint_step < STEPS
    resumed_from = out / "checkpoints" / f"step-{checkpoint_step:06d}"
    assert f"resumed from checkpoint {resumed_from} at step {checkpoint_step}" in (out.parent / "run.log").read_text()
    uninterrupted, resumed = metrics(lora_run), metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(uninterrupted, resumed):
        assert (a["step"], a["num_vision_tokens"], a["loss"]) == (b["step"], b["num_vision_tokens"], b["loss"])


def test_resume_on_one_rank_continues(lora_run, stage1_run, synthetic_shards, tmp_path):
    """A copy cut back to step 8 resumes on one rank from DeepSpeed's universal checkpoint."""
    out = tmp_path / "run"
    cut_back(lora_run, out, 8)
    result = run_training(CONFIG, out, *lora_overrides(stage1_run, synthetic_shards), ranks=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was written by 2 ranks, this run has 1" in result.stderr
    resumed, uninterrupted = metrics(out), metrics(lora_run)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed[8:], uninterrupted[8:]):
        assert math.isfinite(a["loss"]) and a["lr"] == pytest.approx(b["lr"], rel=1e-12, abs=0)


@pytest.fixture(scope="module")
def bf16_lora_run(stage1_run, tiled, tmp_path_factory):
    """4 bf16 steps on tiled images (4 tiles per image), adapters on the LM."""
    out = tmp_path_factory.mktemp("lora_bf16") / "run"
    result = run_training(CONFIG, out, f"model.init_from={stage1_run / 'final'}", f"data.shards={tiled / 'shards'}",
                          "train.max_steps=4", "train.save_every=4", "train.precision=bf16", "data.max_tiles=4",
                          "data.multi_image_max_tiles=2", "tokens.counts={16: 1, 64: 1}", "train.export_final=false",
                          module="tests.record_dtypes")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_bf16_adapters_are_bf16_with_fp32_masters(bf16_lora_run):
    for rank in (0, 1):
        record = engine_record(bf16_lora_run, rank)
        parameters = record["parameters"]
        assert any(is_adapter(name) and p["trains"] for name, p in parameters.items())
        assert {(p["dtype"], p["device"]) for p in parameters.values()} == {("torch.bfloat16", "cpu")}
        assert record["master_weights"] == ["torch.float32"] and record["grad_accum"] == "torch.float32"
    losses = [m["loss"] for m in metrics(bf16_lora_run)]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


# ---- conversion ----

def test_merged_folder_is_an_ordinary_folder_with_the_lora_models_logits(lora_run, stage1_run, tmp_path):
    convert_checkpoint(lora_run, tmp_path / "merged", verify=True)
    folder = tmp_path / "merged"
    plain = stage1_run / "final"
    assert load_file(folder / "model.safetensors").keys() == load_file(plain / "model.safetensors").keys()
    assert (folder / "config.json").read_text() == (stage1_run / "final" / "config.json").read_text()
    expected = probe_logits(reference_model(lora_run))
    merged = probe_logits(TokenFlexVLM.from_pretrained(folder))
    torch.testing.assert_close(merged, expected, **merge_tolerance(expected))
    base = probe_logits(TokenFlexVLM.from_pretrained(stage1_run / "final"))
    assert (base - expected).abs().max() > 100 * merge_tolerance(expected)["atol"], "training changed nothing"
    # plain transformers, through the folder's remote code
    remote = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert torch.equal(probe_logits(remote), merged)
    assert "merged into these weights" in (folder / "README.md").read_text()
    # training's own export is the same merged model
    assert torch.equal(probe_logits(TokenFlexVLM.from_pretrained(lora_run / "final")), merged)


def test_adapter_folder_loads_with_peft_onto_the_base_with_the_same_logits(lora_run, stage1_run, tmp_path):
    out = tmp_path / "adapters"
    convert_checkpoint(lora_run, out, adapters=True, verify=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((stage1_run / "final").resolve())
    assert config["modules_to_save"] == ["projector", "tile_layout"] and config["r"] == 8
    model = peft.PeftModel.from_pretrained(TokenFlexVLM.from_pretrained(config["base_model_name_or_path"]), out)
    assert torch.equal(probe_logits(model), probe_logits(reference_model(lora_run)))
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card
    assert f"kept apart: a peft adapter folder over `{config['base_model_name_or_path']}`" in card


def test_verification_catches_a_merged_folder_without_the_training(lora_run, stage1_run):
    """Stage 1's folder, the LoRA run's start, is not the adapted model: verify_folder refuses it."""
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(lora_run / "checkpoints"))
    with pytest.raises(ConversionError, match="logits are further than fp32 rounding"):
        verify_folder(stage1_run / "final", lora_run / "checkpoints" / "model", state_dict)


def test_adapters_refused_for_a_run_without_them(stage1_run, tmp_path):
    with pytest.raises(ConversionError, match="holds no LoRA adapters"):
        convert_checkpoint(stage1_run, tmp_path / "out", adapters=True)


# ---- start-up refusals, naming the key ----

@pytest.mark.parametrize("overrides, named", [
    (["train.stage=align"], "model.lora.enabled=true trains adapters in stage 2"),
    (["model.lora.vision=true", "optim.vision_lr=0"], "model.lora.vision=true .* optim.vision_lr=0 freezes it"),
    (["model.lora.target_modules=[q_proj, qkv]"], r"model\.lora\.target_modules: \['qkv'\] match no linear layer"),
    (["model.lora.vision=true", "optim.vision_lr=1e-4", "model.lora.vision_target_modules=[o_proj]"],
     r"model\.lora\.vision_target_modules: \['o_proj'\] match no linear layer .*\(SiglipVisionModel\)"),
])
def test_refused_at_start_up(stage1_run, synthetic_shards, tmp_path, overrides, named):
    cfg = load_config(REPO / "configs" / CONFIG, [f"model.init_from={stage1_run / 'final'}",
                                                  f"model.vision_path={stage1_run / 'final'}",
                                                  f"model.lm_path={stage1_run / 'final'}",
                                                  f"data.shards={synthetic_shards}",
                                                  f"train.output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ValueError, match=named):
        check_inputs(cfg)


def test_resume_must_keep_the_adapters(lora_run, stage1_run, synthetic_shards):
    overrides = [*lora_overrides(stage1_run, synthetic_shards), f"train.output_dir={lora_run}"]
    check_inputs(load_config(REPO / "configs" / CONFIG, overrides))
    with pytest.raises(ValueError, match="model.lora: checkpoint .* a resume must keep model.lora"):
        check_inputs(load_config(REPO / "configs" / CONFIG, [*overrides, "model.lora.rank=4"]))

