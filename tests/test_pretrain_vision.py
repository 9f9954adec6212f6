"""tools/pretrain_vision: the tiny tower's pretraining is deterministic, learns its per-patch
objective, leaves the LMs as they were, and never sees an image of the task's splits."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from tools import make_synthetic
from tools.make_tiny_models import make_tiny_models
from tools.pretrain_vision import (
    COLOURS,
    KINDS,
    PRETRAINING_BACKGROUNDS,
    SHOWN,
    patch_majority,
    pretrain_vision_tower,
    pretraining_scene,
    pretraining_set,
    render_with_labels,
)

TASK_COLOURS = {**make_synthetic.BACKGROUNDS, **make_synthetic.LARGE_COLOURS, **make_synthetic.SMALL_COLOURS,
                **make_synthetic.DOT_COLOURS}


def tower(seed=0):
    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=64, patch_size=4)
    return SiglipVisionModel(config), SiglipImageProcessor(size={"height": 64, "width": 64})


def short_pretraining(seed=0, steps=3, **options):
    model, processor = tower()
    report = pretrain_vision_tower(model, processor, steps=steps, seed=seed, scenes=32, batch=8, held_out=16, **options)
    return model.state_dict(), report


def test_pretraining_is_deterministic_per_seed_and_changes_the_tower():
    first, report = short_pretraining(seed=0)
    again, _ = short_pretraining(seed=0)
    other, _ = short_pretraining(seed=1)
    initial = tower()[0].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert not torch.equal(first["embeddings.patch_embedding.weight"],
                           initial["embeddings.patch_embedding.weight"])
    assert report["steps"] == 3 and set(report["held_out"]) >= {"colour_accuracy", "kind_accuracy"}


def test_pretraining_leaves_torch_random_state_and_thread_count_as_they_were():
    """What make_tiny_models draws after the pretraining (the LMs' init) is what it drew before."""
    model, processor = tower()
    torch.manual_seed(5)
    expected = torch.rand(3)
    threads = torch.get_num_threads()
    torch.manual_seed(5)
    pretrain_vision_tower(model, processor, steps=2, scenes=16, batch=4, held_out=4)
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads


def test_pretraining_learns_each_patch_colour():
    """80 short steps already tell most patches' colour on held-out scenes, those that objects
    cover too, where the heads of the untrained tower are at chance."""
    model, processor = tower()
    report = pretrain_vision_tower(model, processor, steps=80, scenes=400, batch=16, lr=5e-3, held_out=50)
    learned = report["held_out"]
    model, processor = tower()
    untrained = pretrain_vision_tower(model, processor, steps=0, scenes=16, batch=16, held_out=50)["held_out"]
    assert learned["colour_accuracy"] > 0.85 and learned["object_patch_colour_accuracy"] > 0.4
    assert untrained["colour_accuracy"] < 0.1 and untrained["object_patch_colour_accuracy"] < 0.1
    # the figure's scenes are the held-out set's first, with what the heads read in their patches
    pixels, colours, kinds = pretraining_set(SHOWN, "pretrain-held-out:0", 64, 4)
    shown = report["shown"]
    assert np.array_equal(shown["pixels"], pixels.permute(0, 2, 3, 1).numpy())
    assert (shown["colour"] == colours.numpy()).mean() > 0.8 and (shown["kind"] == kinds.numpy()).mean() > 0.6


def test_make_tiny_models_pretrains_the_tower_the_same_each_time_and_leaves_the_lms_as_they_were(tmp_path):
    for name, steps in (("a", 2), ("b", 2), ("random", 0)):
        make_tiny_models(tmp_path / name, vision_pretrain_steps=steps)
    vision = {name: load_file(tmp_path / name / "vision" / "model.safetensors") for name in ("a", "b", "random")}
    assert all(torch.equal(vision["a"][k], vision["b"][k]) for k in vision["a"])
    assert not all(torch.equal(vision["a"][k], vision["random"][k]) for k in vision["a"])
    for lm in ("qwen2", "llama", "base"):
        pretrained, random_tower = (load_file(tmp_path / name / lm / "model.safetensors") for name in ("a", "random"))
        assert all(torch.equal(pretrained[k], random_tower[k]) for k in pretrained), lm
    report = json.loads((tmp_path / "a" / "vision" / "pretraining.json").read_text())
    assert report["steps"] == 2 and report["seed"] == 0 and "shown" not in report
    with Image.open(tmp_path / "a" / "vision" / "pretraining.png") as figure:  # scenes beside what the heads read
        assert figure.width > 500 and figure.height > 200 * SHOWN
    assert not (tmp_path / "random" / "vision" / "pretraining.json").exists()
    assert not (tmp_path / "random" / "vision" / "pretraining.png").exists()


def test_labels_are_the_pixels_colours_and_kinds():
    """Every pixel's colour label is its colour, the background's pixels are the kind background,
    and a patch's target is the label most of its pixels have."""
    scene_rng = random.Random(0)
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.uint8)
    for _ in range(20):
        background, objects = pretraining_scene(scene_rng, 64)
        pixels, colour_map, kind_map = render_with_labels(background, objects, 64)
        assert (palette[colour_map] == pixels).all()
        assert ((kind_map == 0) == (colour_map == names.index(background))).all()  # objects never take its colour
    labels = np.random.default_rng(0).integers(0, 3, (8, 8))
    labels[:4, :4] = 2  # the top-left 4 x 4 patch all label 2
    majority = patch_majority(labels, 4, 3)
    assert majority.shape == (4,) and majority[0] == 2
    assert all(majority[i] == np.bincount(block.ravel(), minlength=3).argmax()
               for i, block in enumerate([labels[:4, :4], labels[:4, 4:], labels[4:, :4], labels[4:, 4:]]))
    assert set(KINDS) == {"background", *make_synthetic.SHAPES}


@pytest.mark.parametrize("layout", ["square", "wide", "tall"])
def test_task_images_hold_only_task_colours_and_pretraining_images_always_one_of_their_own(layout):
    """The argument that no pretraining image is a task image: the task draws only its palettes'
    colours (PIL does not antialias), every pretraining image shows a background colour of no
    task palette."""
    assert not set(PRETRAINING_BACKGROUNDS) & set(TASK_COLOURS)
    assert not {tuple(c) for c in PRETRAINING_BACKGROUNDS.values()} & {tuple(c) for c in TASK_COLOURS.values()}
    rng = random.Random(0)
    task = {tuple(c) for c in TASK_COLOURS.values()}
    for split in make_synthetic.SPLITS:
        for _ in range(20):
            image = make_synthetic.render(make_synthetic.scene_in_split(rng, 64, split, layout))
            assert {colour for _, colour in image.getcolors(4096)} <= task
    pixels, _, _ = pretraining_set(200, "pretrain:0", 64, 4)
    own = torch.tensor(list(PRETRAINING_BACKGROUNDS.values()), dtype=torch.uint8)
    shown = (pixels.permute(0, 2, 3, 1).reshape(200, -1, 1, 3) == own).all(-1).any(-1).sum(-1)
    assert (shown >= 64 * 64 // 5).all()  # at least a fifth of every image is its background


def test_no_pretraining_image_is_an_image_of_the_demos_splits(tmp_path):
    """The pretraining scenes against the images that tools.demo's splits start with (same
    commands, fewer records): no image in common."""
    from PIL import Image
    pixels, _, _ = pretraining_set(2000, "pretrain:0", 64, 4)
    pretraining = {image.permute(1, 2, 0).contiguous().numpy().tobytes() for image in pixels}
    assert len(pretraining) == 2000
    for split in make_synthetic.SPLITS:
        make_synthetic.main(["--out", str(tmp_path / split), "--n", "200", "--split", split])
        for path in (tmp_path / split / "images").iterdir():
            with Image.open(path) as image:
                assert image.convert("RGB").tobytes() not in pretraining
