"""TokenFlexVLM end to end on the tiny real checkpoints: slots, labels, loss, gradients,
attention implementations, save/load, dtypes, generation, multiple-choice scoring and timing."""

import json
import math
from dataclasses import asdict

import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids
from transformers.utils import is_flash_attn_2_available

from pipeline.model.chat import IGNORE_INDEX, IMAGE_TOKEN, expand_image_markers, tokenize_record
from pipeline.model.vlm import TokenFlexVLM

N = 64

CONVERSATION = [
    {"role": "user", "content": f"{IMAGE_TOKEN}\nwhat is the colour of the shape?"},
    {"role": "assistant", "content": "red circle"},
    {"role": "user", "content": "how many shapes are there?"},
    {"role": "assistant", "content": "two"},
]
REPLIES = "red circle<|im_end|>two<|im_end|>"
TEXT_ONLY = [{"role": "user", "content": "what is two plus three?"}, {"role": "assistant", "content": "five"}]


def build_model(tiny_models, lm="qwen2", seed=0, attn_implementation="sdpa"):
    torch.manual_seed(seed)  # the projector is random-init
    return TokenFlexVLM.from_components(tiny_models / "vision", tiny_models / lm,
                                        attn_implementation=attn_implementation)


@pytest.fixture(scope="module")
def model(tiny_models):
    return build_model(tiny_models)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]


def tokenize(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)


def sample(model, messages, num_tokens):
    """input_ids and labels of one conversation, markers expanded to num_tokens slots."""
    encoded = tokenize(model.tokenizer, messages)
    labels = [t if m else IGNORE_INDEX for t, m in zip(encoded["input_ids"], encoded["assistant_masks"])]
    return expand_image_markers(encoded["input_ids"], labels, model.config.image_token_id, num_tokens)


def make_batch(model, rows, pixel_values, image_mask, image_grids=None):
    width = max(len(ids) for ids, _ in rows)
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    batch = dict(input_ids=input_ids, labels=labels, position_ids=torch.arange(width).expand(len(rows), width).clone(),
                 pixel_values=pixel_values, image_mask=image_mask)
    if image_grids is not None:
        batch["image_grids"] = image_grids
    return {name: tensor.to(model.device) for name, tensor in batch.items()}


def image_batch(model, images, num_tokens=N):
    row = sample(model, CONVERSATION, num_tokens)
    return make_batch(model, [row], model.prepared_images(images[:1])["pixel_values"], torch.tensor([True]))


def text_only_batch(model):
    return make_batch(model, [sample(model, TEXT_ONLY, N)], **model.image_inputs([]))


# ---- image slots ----

@pytest.mark.parametrize("num_tokens", [1, 64, 144, 256])
def test_expand_image_markers_gives_n_slots_per_marker(num_tokens):
    image = 99
    ids, labels = expand_image_markers([5, image, 6, 7, image, 8], [-100, -100, 6, 7, -100, 8], image, num_tokens)
    assert ids.count(image) == 2 * num_tokens
    assert len(ids) == len(labels) == 4 + 2 * num_tokens
    assert [t for t in ids if t != image] == [5, 6, 7, 8]
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == image)
    assert [lab for t, lab in zip(ids, labels) if t != image] == [-100, 6, 7, 8]
    # slots are contiguous where each marker was
    assert ids[1:1 + num_tokens] == [image] * num_tokens


@pytest.mark.parametrize("num_tokens", [16, 64, 144, 256])
def test_embed_fills_exactly_n_slots_with_projected_features(model, images, num_tokens):
    ids, _ = sample(model, CONVERSATION, num_tokens)
    input_ids = torch.tensor([ids])
    slots = input_ids == model.config.image_token_id
    assert int(slots.sum()) == num_tokens
    pixel_values = model.prepared_images(images[:1])["pixel_values"]
    with torch.no_grad():
        embeds = model.embed(input_ids, pixel_values, torch.tensor([True]), num_tokens)
        features = model.encode_images(pixel_values, num_tokens)
        text = model.language_model.get_input_embeddings()(input_ids)
    assert features.shape == (1, num_tokens, model.language_model.config.hidden_size)
    torch.testing.assert_close(embeds[slots], features[0])
    torch.testing.assert_close(embeds[~slots], text[~slots])


def test_embed_two_images_fill_their_slots_in_order(model, images):
    ids, _ = sample(model, CONVERSATION, N)
    second, _ = sample(model, CONVERSATION, N)
    input_ids = torch.tensor([ids, second])
    pixel_values = model.prepared_images(images)["pixel_values"]
    with torch.no_grad():
        embeds = model.embed(input_ids, pixel_values, torch.tensor([True, True]), N)
        features = model.encode_images(pixel_values, N)
    slots = input_ids == model.config.image_token_id
    torch.testing.assert_close(embeds[0][slots[0]], features[0])
    torch.testing.assert_close(embeds[1][slots[1]], features[1])
    assert not torch.allclose(features[0], features[1])


@pytest.mark.parametrize("slot_count", [N - 1, N + 1, 0, 2 * N])
def test_embed_rejects_wrong_slot_count(model, images, slot_count):
    ids, _ = sample(model, [{"role": "user", "content": "hello"}], N)
    image = model.config.image_token_id
    input_ids = torch.tensor([ids[:1] + [image] * slot_count + ids[1:]])
    with pytest.raises(ValueError, match=rf"batch has {slot_count} image slots"):
        model.embed(input_ids, model.prepared_images(images[:1])["pixel_values"], torch.tensor([True]), N)


def test_forward_rejects_markers_expanded_to_a_different_n(model, images):
    batch = image_batch(model, images, num_tokens=144)
    with pytest.raises(ValueError, match="slots"):
        model(batch, 64)


# ---- label masking and loss ----

def test_assistant_mask_labels_exactly_the_replies(model):
    encoded = tokenize(model.tokenizer, CONVERSATION)
    labelled = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert model.tokenizer.decode(labelled) == REPLIES
    # nothing of the prompts, roles or the image marker is labelled
    unlabelled = model.tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if not m])
    assert "red circle" not in unlabelled and "<|im_end|>" in unlabelled and IMAGE_TOKEN in unlabelled


@pytest.mark.parametrize("num_tokens", [1, 64, 256])
def test_image_slots_and_prompt_are_ignored_after_expansion(model, num_tokens):
    ids, labels = sample(model, CONVERSATION, num_tokens)
    image = model.config.image_token_id
    assert ids.count(image) == num_tokens
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == image)
    supervised = [lab for lab in labels if lab != IGNORE_INDEX]
    assert model.tokenizer.decode(supervised) == REPLIES
    # supervised labels are the input tokens themselves, at the same positions
    assert all(lab == t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX)
    # the first user turn (everything before the first reply) is entirely ignored
    first = labels.index(supervised[0])
    assert first > ids.index(image) + num_tokens
    assert set(labels[:first]) == {IGNORE_INDEX}


@pytest.fixture(scope="module")
def loss_and_logits(model, images):
    batch = image_batch(model, images)
    with torch.no_grad():
        out = model(batch, N, return_logits=True)
    return batch, out


def test_loss_is_cross_entropy_over_supervised_shifted_positions(model, loss_and_logits):
    batch, out = loss_and_logits
    logits, labels = out.logits[0, :-1], batch["labels"][0, 1:]
    keep = labels != IGNORE_INDEX
    assert model.tokenizer.decode(labels[keep]) == REPLIES
    manual = F.cross_entropy(logits[keep].float(), labels[keep])
    torch.testing.assert_close(out.loss, manual)
    # and it is not the loss over every position (so the masking is what makes them equal)
    everything = F.cross_entropy(logits.float(), batch["input_ids"][0, 1:])
    assert not torch.allclose(out.loss, everything)


def test_loss_depends_on_which_positions_are_supervised(model, loss_and_logits):
    """Labels, not the inputs, pick the supervised positions: un-ignoring one prompt position or
    ignoring one reply position changes the loss, and the same batch gives the same loss again."""
    batch, out = loss_and_logits
    labels = batch["labels"][0]
    prompt = (labels == IGNORE_INDEX).nonzero()[5].item()
    widened = dict(batch, labels=batch["labels"].clone())
    widened["labels"][0, prompt] = batch["input_ids"][0, prompt]
    supervised = (labels != IGNORE_INDEX).nonzero()[0].item()
    narrowed = dict(batch, labels=batch["labels"].clone())
    narrowed["labels"][0, supervised] = IGNORE_INDEX
    with torch.no_grad():
        assert not torch.allclose(model(widened, N).loss, out.loss)
        assert not torch.allclose(model(narrowed, N).loss, out.loss)
        assert torch.equal(model(batch, N).loss, out.loss)


# ---- packed rows under each attention implementation ----

FLASH_CALLS = []  # the variable-length arguments each flash_attention_on_cpu call was given


def flash_attention_on_cpu(module, query, key, value, attention_mask, scaling=None, position_ids=None,
                           cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """flash-attention's treatment of packed rows, in plain torch, as transformers'
    _flash_attention_forward decides: the sequences' boundaries when the caller gives them
    (cu_seq_lens), else found from the position ids (_is_packed_sequence), which it does only for
    a batch of one row; each sequence then attends causally within itself."""
    FLASH_CALLS.append((cu_seq_lens_q, max_length_q))
    if cu_seq_lens_q is not None:
        spans = list(zip(cu_seq_lens_q[:-1].tolist(), cu_seq_lens_q[1:].tolist()))
    elif _is_packed_sequence(position_ids, query.shape[0]):
        (starts, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        spans = list(zip(starts[:-1].tolist(), starts[1:].tolist()))
    else:
        spans = [(0, query.shape[2])]  # one sequence per row
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                    scale=scaling, enable_gqa=True) for a, b in spans], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("flash_attention_on_cpu", flash_attention_on_cpu)


def attn_implementations():
    """Every implementation this machine runs. flash_attention_2 needs the flash-attn package
    and a GPU: it is a parameter on machines that have both (bench/gpu_check.sh runs it), and
    flash_attention_on_cpu stands in for its packing rule everywhere."""
    return ["sdpa", "eager", "flash_attention_on_cpu"] + (["flash_attention_2"] if is_flash_attn_2_available() else [])


def model_with_attention(tiny_models, attn_implementation):
    if attn_implementation == "flash_attention_on_cpu":
        model = build_model(tiny_models)
        model.language_model.config._attn_implementation = attn_implementation
        return model.eval()
    model = build_model(tiny_models, attn_implementation=attn_implementation).eval()
    if attn_implementation == "flash_attention_2":
        model.to("cuda", torch.bfloat16)
    return model


def packed_rows(model, images, restart_positions=True):
    """Two rows, each of the image conversation and the text-only one packed end to end (in
    both orders), with their alone-forward logits; position ids restart per sample, or run on
    across the row (then nothing stops the second sample from attending to the first)."""
    first, second = sample(model, CONVERSATION, N), sample(model, TEXT_ONLY, N)
    image = model.prepared_images(images[:1])["pixel_values"]
    packed = make_batch(model, [(first[0] + second[0], first[1] + second[1]),
                                (second[0] + first[0], second[1] + first[1])],
                        torch.cat([image, image]), torch.tensor([True, True]))
    if restart_positions:
        packed["position_ids"] = torch.tensor([list(range(len(first[0]))) + list(range(len(second[0]))),
                                               list(range(len(second[0]))) + list(range(len(first[0])))],
                                              device=model.device)
    with torch.no_grad():
        logits = model(packed, N, return_logits=True).logits
        alone = [model(make_batch(model, [first], image, torch.tensor([True])), N, return_logits=True).logits[0],
                 model(make_batch(model, [second], **model.image_inputs([])), N, return_logits=True).logits[0]]
    split = len(first[0])
    return [(logits[0, :split], alone[0]), (logits[0, split:], alone[1]),
            (logits[1, :-split], alone[1]), (logits[1, -split:], alone[0])]


@pytest.mark.parametrize("attn_implementation", attn_implementations())
def test_packed_samples_do_not_attend_to_each_other(tiny_models, images, attn_implementation):
    """Samples packed in rows (position ids restarting) give the same logits as each alone, in
    every row; with position ids running on across a row the later sample's logits change, so
    the comparison sees one sample attending to another (RoPE is relative: within a sample,
    shifted positions alone change nothing beyond rounding)."""
    model = model_with_attention(tiny_models, attn_implementation)
    tolerance = dict(rtol=2e-2, atol=2e-2) if model.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for packed, alone in packed_rows(model, images):
        torch.testing.assert_close(packed.float(), alone.float(), **tolerance)
    leaked = packed_rows(model, images, restart_positions=False)
    for packed, alone in (leaked[1], leaked[3]):
        assert not torch.allclose(packed.float(), alone.float(), **tolerance)


def test_flash_attention_sees_packing_only_in_rows_laid_end_to_end(tiny_models, images):
    """Why lm_hidden_states lays packed rows end to end under flash-attention: given two rows
    at once, its packing rule sees none and lets packed samples attend to each other."""
    model = model_with_attention(tiny_models, "flash_attention_on_cpu")
    first, second = sample(model, CONVERSATION, N), sample(model, TEXT_ONLY, N)
    rows = [first[0] + second[0], second[0] + first[0]]
    positions = torch.tensor([list(range(len(first[0]))) + list(range(len(second[0]))),
                              list(range(len(second[0]))) + list(range(len(first[0])))])
    embeds = model.language_model.get_input_embeddings()(torch.tensor(rows))
    with torch.no_grad():
        laid_out = model.lm_hidden_states(embeds, positions, None)
        two_rows = model.language_model.model(inputs_embeds=embeds, position_ids=positions,
                                              use_cache=False).last_hidden_state
        alone = model.language_model.model(inputs_embeds=embeds[:1, len(first[0]):], use_cache=False).last_hidden_state
    torch.testing.assert_close(laid_out[0, len(first[0]):], alone[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(two_rows[0, len(first[0]):], alone[0], rtol=1e-4, atol=1e-4)


def test_flash_attention_is_handed_the_packed_sequences_boundaries(tiny_models, images):
    """lm_hidden_states computes the packed sequences' boundaries once, where the position ids lie,
    and hands them to every layer: flash-attention then has no need to find them itself (with a
    device sync per layer)."""
    model = model_with_attention(tiny_models, "flash_attention_on_cpu")
    lengths = [5, 7, 3, 9]  # two rows of 12 tokens, two sequences each
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(3)) + list(range(9))])
    embeds = torch.randn(2, 12, model.language_model.config.hidden_size)
    FLASH_CALLS.clear()
    with torch.no_grad():
        model.lm_hidden_states(embeds, positions, None)
    assert len(FLASH_CALLS) == model.language_model.config.num_hidden_layers
    for starts, longest in FLASH_CALLS:
        assert starts.tolist() == [0, 5, 12, 15, 24] and starts.dtype == torch.int32
        assert longest == max(lengths) and isinstance(longest, int)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_lm_and_the_vision_tower(tiny_models, tmp_path, attn_implementation):
    built = build_model(tiny_models, attn_implementation=attn_implementation)
    built.save_pretrained(tmp_path / "vlm")
    loaded = TokenFlexVLM.from_pretrained(tmp_path / "vlm", attn_implementation=attn_implementation)
    for model in (built, loaded):
        assert model.language_model.config._attn_implementation == attn_implementation
        assert model.vision_tower.config._attn_implementation == attn_implementation
    assert (
        "attn_implementation" not in (tmp_path / "vlm" / "config.json").read_text()
    )  # a choice of the run, not the folder


@pytest.mark.skipif(is_flash_attn_2_available(), reason="flash-attn and a GPU are here, so flash_attention_2 works")
def test_flash_attention_2_without_flash_attn_or_gpu_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match=r"flash_attention_2 needs a CUDA GPU and the flash-attn package \(pip install "
                                         r"flash-attn.*\); here torch sees \d+ GPU\(s\)"):
        build_model(tiny_models, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation 'flash' is not one of sdpa, eager, flash_attention_2"):
        build_model(tiny_models, attn_implementation="flash")


def test_gradient_checkpointing_keeps_loss_and_gradients(tiny_models, images):
    from stages.common import enable_gradient_checkpointing

    results = []
    for checkpointing in (False, True):
        model = build_model(tiny_models)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        loss = model(image_batch(model, images), N).loss
        loss.backward()
        results.append((loss.detach(), model.projector.gate.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_loss_without_supervised_tokens_is_zero_and_differentiable(model, images):
    batch = image_batch(model, images)
    batch["labels"][:] = IGNORE_INDEX
    loss = model(batch, N).loss
    assert loss.item() == 0.0 and loss.requires_grad


# ---- gradients ----

def vision_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch, N)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.vision_tower.named_parameters()}
    projector = {name: p.grad for name, p in model.projector.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, projector


def test_text_only_batch_still_gives_vision_params_zero_grads(model, images):
    batch = text_only_batch(model)
    assert not (batch["input_ids"] == model.config.image_token_id).any()
    text_grads, text_projector = vision_grads(model, batch)
    image_grads, _ = vision_grads(model, image_batch(model, images))
    # every vision parameter an image batch trains also joins backward without an image
    used = {name for name, g in image_grads.items() if g is not None}
    assert "embeddings.patch_embedding.weight" in used
    assert any(name.startswith("encoder.layers.0.") for name in used)  # vision_feature_layer -2 of 2 layers
    assert used == {name for name, g in text_grads.items() if g is not None}
    assert all(torch.count_nonzero(text_grads[name]) == 0 for name in used)
    assert any(torch.count_nonzero(image_grads[name]) > 0 for name in used)
    # the projector too
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in text_projector.values())


def test_model_from_separate_components_trains(tiny_models, images):
    model = TokenFlexVLM.from_components(tiny_models / "vision", tiny_models / "qwen2")
    assert model.config.image_token_id == model.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    batch = image_batch(model, images, num_tokens=144)
    out = model(batch, 144)
    assert out.logits is None and out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    for module in (model.projector, model.vision_tower.embeddings, model.language_model.model.layers[0]):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)
        assert any(torch.count_nonzero(g) > 0 for g in grads)


# ---- persistence ----

def as_json(config):
    return json.loads(json.dumps(asdict(config), default=str))


@pytest.mark.parametrize("lm", ["qwen2", "llama"])
def test_save_and_load_give_identical_logits(tiny_models, images, tmp_path, lm):
    model = build_model(tiny_models, lm, seed=1).eval()
    batch = image_batch(model, images)
    with torch.no_grad():
        before = model(batch, N, return_logits=True)
    model.save_pretrained(tmp_path / "vlm")
    loaded = TokenFlexVLM.from_pretrained(tmp_path / "vlm").eval()
    assert type(loaded.language_model) is type(model.language_model)
    # equal up to JSON's string keys (id2label)
    assert as_json(loaded.config) == as_json(model.config)
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    with torch.no_grad():
        after = loaded(batch, N, return_logits=True)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.loss, after.loss)
    assert (loaded.language_model.lm_head.weight.data_ptr()
            == loaded.language_model.get_input_embeddings().weight.data_ptr())


def test_models_are_built_in_the_asked_dtype_whatever_the_checkpoints_were_saved_in(tiny_models, tmp_path):
    """Real LM folders (Qwen2, Llama) ship bf16 weights with dtype bfloat16 in config.json, which
    transformers' from_pretrained and from_config follow by default."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_models / "qwen2", dtype=torch.bfloat16)
    lm.save_pretrained(tmp_path / "bf16_lm")
    build_model(tiny_models).tokenizer.save_pretrained(tmp_path / "bf16_lm")
    assert json.loads((tmp_path / "bf16_lm" / "config.json").read_text())["dtype"] == "bfloat16"

    model = TokenFlexVLM.from_components(tiny_models / "vision", tmp_path / "bf16_lm")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.save_pretrained(tmp_path / "vlm")
    for dtype, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16), (torch.float16, torch.float16)):
        loaded = TokenFlexVLM.from_pretrained(tmp_path / "vlm", dtype=dtype)
        assert {p.dtype for p in loaded.parameters()} == {expected} and loaded.dtype == expected
        # RoPE's inverse frequencies stay fp32: in bf16 they would shift long-context positions
        assert loaded.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'half' is not one of bf16, fp16, fp32"):
        TokenFlexVLM.from_pretrained(tmp_path / "vlm", dtype="half")


# ---- inference ----

@pytest.fixture(scope="module")
def saved_model(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "vlm"
    build_model(tiny_models, seed=3).save_pretrained(folder)
    return folder


def test_bf16_model_batches_and_loss(saved_model, images):
    """In bf16, the batch builders give 8-bit pixel values on the model's device (the forward
    normalizes them), the logits are bf16 and the cross-entropy is computed in fp32: the loss
    matches fp32's to bf16 precision."""
    fp32 = TokenFlexVLM.from_pretrained(saved_model).eval()
    bf16 = TokenFlexVLM.from_pretrained(saved_model, "cpu", "bf16").eval()
    samples = [dict(zip(("input_ids", "labels"), sample(bf16, CONVERSATION, 1)), **fp32.prepared_images(images[0])),
               dict(zip(("input_ids", "labels"), sample(bf16, TEXT_ONLY, 1)), **fp32.prepared_images(None))]
    batch = bf16.labelled_batch(samples, N)
    assert all(t.device == bf16.device for t in batch.values())
    assert batch["pixel_values"].dtype == torch.uint8 and batch["image_mask"].tolist() == [True]
    assert bf16.prepared_images(images)["pixel_values"].dtype == torch.uint8
    assert bf16.image_inputs([])["pixel_values"].dtype == torch.uint8
    with torch.no_grad():
        out = bf16(batch, N, return_logits=True)
        reference = fp32(fp32.labelled_batch(samples, N), N, return_logits=True)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, reference.loss, rtol=2e-2, atol=0)
    assert out.loss != reference.loss  # really computed in bf16
    answers = bf16.generate([images[0], None], ["what colour?", "two plus three?"], N, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert bf16.prefill_seconds([images[0]], ["what colour?"], N) > 0


@pytest.fixture(scope="module")
def talkative_model(tiny_models):
    """Random-init LMs greedily emit only newlines (which generate() strips); larger random
    weights make the answers non-empty so that comparing them means something."""
    model = build_model(tiny_models, seed=2).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.language_model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.5, generator=generator)
    return model


@pytest.mark.parametrize("num_tokens", [64, 144, 256])
def test_greedy_generation_is_deterministic(talkative_model, images, num_tokens):
    prompts = ["what is the colour of the shape?"] * 3
    first = talkative_model.generate([images[0], images[1], None], prompts, num_tokens, max_new_tokens=8)
    second = talkative_model.generate([images[0], images[1], None], prompts, num_tokens, max_new_tokens=8)
    assert first == second
    assert len(first) == 3 and all(isinstance(a, str) and a for a in first)
    # the batch does not leak between rows: each answer equals the same prompt generated alone
    alone = talkative_model.generate([images[1]], prompts[:1], num_tokens, max_new_tokens=8)
    assert alone == first[1:2]


def test_generate_text_only_prompt(talkative_model):
    answers = talkative_model.generate([None], ["what is two plus three?"], 64, max_new_tokens=6)
    assert len(answers) == 1 and answers[0]
    # a text-only prompt has no image slots, so N does not change the answer
    assert talkative_model.generate([None], ["what is two plus three?"], 256, max_new_tokens=6) == answers


TAUGHT = ("what is the colour of the shape?", "red circle")  # taught_model's question on the red image, and its reply


@pytest.fixture(scope="module")
def taught_model(tiny_models, images):
    """A tiny model trained here (AdamW, one conversation: the red image, TAUGHT's question and
    reply) until greedy generation gives TAUGHT's reply: a model that has learned something. The
    random-init models' greedy replies are newlines or special tokens, so no choice is ever greedy."""
    model = build_model(tiny_models)
    question, reply = TAUGHT
    record = {
        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": reply}]
    }
    input_ids, labels = tokenize_record(record, model.tokenizer, 1)  # as the data loader tokenizes it
    batch = model.labelled_batch([{"input_ids": input_ids, "labels": labels, **model.prepared_images(images[:1])}], 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, 101):
        model.train()
        loss = model(batch, 16).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 and model.eval().generate(images[:1], [question], 16, max_new_tokens=8) == [reply]:
            return model
    pytest.fail(f"the tiny model did not learn to answer {reply!r} in 100 steps")


def test_the_greedy_reply_scored_as_a_choice_is_greedy_with_its_generations_log_probability(taught_model, images):
    """Multiple choice (reply_log_likelihoods, what lmms-eval's loglikelihood requests get): the
    model's own greedy reply (scored_generate) scored as a choice is greedy, and its log-likelihood
    is the generation's log-probability (its tokens and end token); another choice is not greedy."""
    question, _ = TAUGHT
    answers, _, probabilities = taught_model.scored_generate(
        lambda: taught_model.inference_inputs(images[:1], [question], 16), 8)
    assert answers == [TAUGHT[1]]  # a non-empty reply, ended by the end token within 8 tokens
    (own, other), = taught_model.reply_log_likelihoods(images[:1], [question], [[answers[0], "blue square"]], 16)
    assert own[1] is True and other[1] is False
    assert own[0] == pytest.approx(math.log(probabilities[0]), abs=1e-4)
    assert other[0] < own[0]


def test_prefill_seconds_is_positive_float(model, images):
    seconds = model.prefill_seconds([images[0]], ["what is the colour?"], 144)
    assert isinstance(seconds, float) and seconds > 0
    assert model.prefill_seconds([None], ["hello"], 64) > 0


def test_vision_tower_loads_from_a_full_siglip_folder(tmp_path):
    """A text+vision SigLIP checkpoint (how google/siglip-* ship) gives its vision model."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

    from pipeline.model.vision import load_vision_tower

    config = SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8))
    full = SiglipModel(config)
    full.save_pretrained(tmp_path)
    tower = load_vision_tower(tmp_path)
    assert isinstance(tower, SiglipVisionModel)
    patch = tower.get_input_embeddings().weight
    assert torch.equal(patch, full.vision_model.get_input_embeddings().weight)
    assert not torch.equal(patch, SiglipVisionModel(config.vision_config).get_input_embeddings().weight)


# ---- several images per prompt, tiles ----

def test_two_images_and_a_tiled_one_fill_their_slots_in_order(model):
    """One prompt with a wide image cut into 1 x 4 tiles and a square one: the slots hold the
    first image's tiles with row ends and thumbnail (TileLayout), then the second image's tile."""
    wide, square = Image.new("RGB", (256, 64), "green"), Image.new("RGB", (64, 64), "red")
    model.image_processor.multi_image_max_tiles = 4  # let both images of the prompt take tiles
    try:
        prepared = model.prepared_images([wide, square], max_tiles=4)
    finally:
        del model.image_processor.multi_image_max_tiles
    assert prepared["image_grids"] == [(1, 4), (1, 1)] and len(prepared["pixel_values"]) == 6
    prompt = model.prompt_ids("which is wider?", 2)
    inputs = model.image_inputs([prepared])
    with torch.no_grad():
        embeds, _ = model.prompt_embeddings([prompt], inputs, 16)
        tiles = model.encode_images(inputs["pixel_values"], 16)
        expected = model.tile_layout(tiles, [(1, 4), (1, 1)])
    ids = expand_image_markers(prompt, prompt, model.config.image_token_id, [5 * 16 + 1, 16])[0]
    assert ids.count(model.config.image_token_id) == len(expected) == 5 * 16 + 1 + 16
    torch.testing.assert_close(embeds[0][torch.tensor(ids) == model.config.image_token_id], expected)


def test_generation_with_two_images_reads_both_in_order(talkative_model, images):
    prompt = "are the two shapes the same colour?"
    both = talkative_model.generate([[images[0], images[1]]], [prompt], 16, max_new_tokens=6)
    assert both == talkative_model.generate([[images[0], images[1]], None], [prompt, "hi"], 16, max_new_tokens=6)[:1]
    with torch.no_grad():
        forward, _ = talkative_model.inference_inputs([[images[0], images[1]]], [prompt], 16)
        backward, _ = talkative_model.inference_inputs([[images[1], images[0]]], [prompt], 16)
        one, _ = talkative_model.inference_inputs([images[0]], [prompt], 16)
    assert forward.shape == backward.shape and one.shape[1] == forward.shape[1] - 16 - 1  # a marker+newline less
    assert not torch.allclose(forward, backward)  # the images' order is kept


def test_a_folder_written_before_tiles_loads_with_a_warning(tiny_models, tmp_path):
    """Its weights lack the row-end embedding, which one tile per image never uses: the folder
    loads, gives the logits it gave, and says so."""
    from safetensors.torch import load_file, save_file

    model = build_model(tiny_models, seed=4).eval()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["tile_layout.row_end"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="no tile_layout.row_end"):
        loaded = TokenFlexVLM.from_pretrained(tmp_path).eval()
    image = Image.new("RGB", (64, 64), "red")
    with torch.no_grad():
        expected = model.inference_inputs([image], ["what colour?"], 16)[0]
        torch.testing.assert_close(loaded.inference_inputs([image], ["what colour?"], 16)[0], expected)
