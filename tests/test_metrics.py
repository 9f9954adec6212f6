"""A step's FLOPs (pipeline.train.flops.step_flops) checked against torch's own counter.

torch.utils.flop_counter.FlopCounterMode counts matmuls, convolutions and attention on a real
forward + backward of the tiny models. Its table has no entry for the CPU flash-attention
kernel that sdpa runs here, so the tests give it torch's own sdpa formulas for that kernel.
"""

import shutil

import pytest
import torch
from torch.ops import aten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import AutoConfig, AutoImageProcessor, SiglipVisionModel

from pipeline.data import TrainBatches
from pipeline.model.chat import IGNORE_INDEX, load_tokenizer
from pipeline.model.vlm import TokenFlexVLM
from pipeline.run.config import DataConfig
from pipeline.train.flops import Work, step_flops
from stages.common import enable_gradient_checkpointing, set_trainable

N = 16
STAGE1 = {"projector"}
STAGE2 = {"projector", "language_model"}
STAGE2_WITH_TOWER = {"projector", "language_model", "vision_tower"}


def counter(recompute_scores=True):
    """FlopCounterMode that also counts sdpa's CPU kernel. Its backward computes the attention
    scores again (5 matmuls, torch's count); recompute_scores=False counts the 4 that a
    backward storing the scores would run."""
    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        if recompute_scores:
            return sdpa_backward_flop_count(grad_out, query, key, value)
        return 2 * sdpa_flop_count(query, key, value)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    })


def build_model(vision, lm, trained, checkpointing=False, vision_feature_layer=-2):
    torch.manual_seed(0)
    model = TokenFlexVLM.from_components(vision, lm, vision_feature_layer=vision_feature_layer).train()
    set_trainable(model, trained)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def counted_flops(model, batch, recompute_scores=True):
    with counter(recompute_scores) as flops:
        model(batch, N).loss.backward()
    return flops.get_total_flops()


def make_batch(model, samples, pixel_values, image_mask, pad_to=None):
    """One row per list of sample lengths, packed: position ids restart per sample, each sample
    opens with one image's N slots when it has one, its second half is the answer; a row
    shorter than pad_to gets a padding tail."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    images = iter(image_mask[image_mask].tolist())
    for lengths in samples:
        ids, labels, positions = [], [], []
        for length in lengths:
            sample = torch.randint(10, model.config.image_token_id, (length,), generator=generator)
            if next(images, False):
                sample[1:1 + N] = model.config.image_token_id
            answer = sample.clone()
            answer[:length // 2] = IGNORE_INDEX
            ids.append(sample), labels.append(answer), positions.append(torch.arange(length))
        tail = (pad_to or 0) - sum(lengths)
        if tail > 0:
            ids.append(torch.full((tail,), model.tokenizer.pad_token_id))
            labels.append(torch.full((tail,), IGNORE_INDEX)), positions.append(torch.arange(tail))
        rows.append((torch.cat(ids), torch.cat(labels), torch.cat(positions)))
    input_ids, labels, position_ids = (torch.stack(column) for column in zip(*rows))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "pixel_values": pixel_values, "image_mask": image_mask}


def packed_batch(model):
    """Two rows of 160: three packed samples; one sample and a padding tail of 30. Two real
    images and a dummy."""
    pixels = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return make_batch(model, [[60, 40, 60], [130]], pixels, torch.tensor([True, True, False]), pad_to=160)


# ---- what a batch holds ----

def test_work_counts_samples_padding_and_images_from_the_batch(tiny_models):
    model = build_model(tiny_models / "vision", tiny_models / "qwen2", STAGE1)
    work = Work.of(packed_batch(model), model.tokenizer.pad_token_id)
    assert work == Work(positions=320, tokens=290, supervised=30 + 20 + 30 + 65,
                        row_scores=2 * 160 ** 2, sample_scores=60 ** 2 + 40 ** 2 + 60 ** 2 + 130 ** 2,
                        images=3, real_images=2)
    assert work + work == Work(*(2 * v for v in (320, 290, 145, 51200, 25700, 3, 2)))


def test_work_agrees_with_the_packers_own_counts(tiny_models, synthetic_shards):
    tokenizer = load_tokenizer(tiny_models / "qwen2")
    data = TrainBatches(DataConfig(shards=str(synthetic_shards), seq_len=192, rows_per_batch=2, num_workers=0,
                                   text_tokens_per_image=200),
                        tokenizer, AutoImageProcessor.from_pretrained(tiny_models / "vision"))
    batches = [data.next_batch(N) for _ in range(6)]
    assert any(b["stats"]["pad_tokens"] for b in batches) and any(b["stats"]["num_samples"] > 2 for b in batches)
    for batch in batches:
        stats, work = batch["stats"], Work.of(batch, tokenizer.pad_token_id)
        assert (work.tokens, work.positions - work.tokens) == (stats["real_tokens"], stats["pad_tokens"])
        assert (work.real_images, work.images) == (stats["num_tiles"], stats["tile_budget"])
        assert work.sample_scores < work.row_scores


# ---- FLOPs ----

@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
@pytest.mark.parametrize("trained", [STAGE1, STAGE2, STAGE2_WITH_TOWER], ids=["stage1", "stage2", "stage2+tower"])
def test_executed_flops_match_torch_flop_counter(tiny_models, trained, checkpointing):
    model = build_model(tiny_models / "vision", tiny_models / "qwen2", trained, checkpointing)
    batch = packed_batch(model)
    useful, executed = step_flops(model, N, Work.of(batch, model.tokenizer.pad_token_id))
    assert executed == counted_flops(model, batch)  # exactly: every matmul the step runs is counted
    assert useful < 0.9 * executed  # padding, a dummy image, whole-row attention, SigLIP's unused head


@pytest.fixture(scope="module")
def headless_vision(tiny_models, tmp_path_factory):
    """The tiny tower without SigLIP's attention-pooling head, whose output the VLM never reads:
    with it gone, all a model runs is useful work."""
    folder = tmp_path_factory.mktemp("headless_vision")
    config = AutoConfig.from_pretrained(tiny_models / "vision")
    config.vision_use_head = False
    SiglipVisionModel(config).save_pretrained(folder)
    shutil.copy(tiny_models / "vision" / "preprocessor_config.json", folder)
    return folder


@pytest.mark.parametrize("trained", [STAGE1, STAGE2, STAGE2_WITH_TOWER], ids=["stage1", "stage2", "stage2+tower"])
def test_useful_flops_are_executed_flops_less_recomputation(tiny_models, headless_vision, trained):
    """One sample per row, no padding, no dummy image, no unused tower output (no pooling head, and
    features from the last layer): what torch counts less recomputation (the recomputed attention
    scores, checkpointed forwards) is the useful count exactly, and step_flops' executed count is
    torch's count exactly."""
    model = build_model(headless_vision, tiny_models / "qwen2", trained, vision_feature_layer=-1)
    batch = make_batch(
        model, [[100], [100]], torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.tensor([True, True])
    )
    work = Work.of(batch, model.tokenizer.pad_token_id)
    assert (work.tokens, work.sample_scores, work.real_images) == (work.positions, work.row_scores, work.images)
    useful, executed = step_flops(model, N, work)
    assert useful == counted_flops(model, batch, recompute_scores=False)
    assert executed == counted_flops(model, batch)
    checkpointed = build_model(headless_vision, tiny_models / "qwen2", trained, checkpointing=True,
                               vision_feature_layer=-1)
    useful_checkpointed, executed_checkpointed = step_flops(checkpointed, N, work)
    assert useful_checkpointed == useful
    assert executed_checkpointed == counted_flops(checkpointed, batch) > executed


def test_training_logs_useful_and_executed_flops_per_step(stage1_run):
    from tests.distributed import metrics

    for step in metrics(stage1_run):
        assert 0 < step["useful_flops"] < step["executed_flops"], step


def test_a_skipped_step_is_logged_without_loss_and_said_so(tmp_path, caplog):
    """train_step skips a step in which no rank has a supervised token (tests/test_step_loss.py)."""
    import json
    import logging

    from pipeline.run.config import load_config
    from pipeline.train.metrics import MetricsLog
    from tests.distributed import REPO

    cfg = load_config(
        REPO / "configs" / "tiny_cpu_stage1.yaml", [f"train.output_dir={tmp_path}", "wandb.mode=disabled"]
    )
    log = MetricsLog(cfg, {}, start_step=0, wandb_id=None)
    record = {"step": 1, "num_vision_tokens": 16, "update_skipped": True, "loss": None, "lr": 1e-3, "grad_norm": None,
              "tokens_per_s": 10.0}
    with caplog.at_level(logging.INFO, logger="tokenflex"):
        log.log(record)
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == record
    assert "step 1/20  N=16  skipped: no rank had a supervised token" in caplog.text
