"""Pretrain the tiny vision tower on generated scenes, so that its patch features see what each
patch shows, as a real tower's do after its pretraining.

tools.make_tiny_models calls pretrain_vision_tower on the random-init SigLIP tower before saving
it. The objective is dense: for every 4 px patch, which of COLOURS covers most of its pixels and
which kind of object (background, circle, square, triangle), each read by a linear head (then
discarded) from the hidden state the VLM feeds its projector (model.vision_feature_layer -2).
The tower's last layer, which the VLM does not read, keeps its random init. Issue 30 measured
the alternatives with a tiny LM (the demo's LM's shape) trained on the tower's pooled tokens:
with this objective it had learned the left dot's colour at N = 64 to 256 after 600 steps of 32
scenes; with the colours present in each patch (multi-label), the colours of its four 2 x 2 px
quadrants, its four neighbours' colours as well, heads on the last layer as well, or no
pretraining, it had not.

The scenes are their own: their own generator (objects of every colour, kind and size down to
3 px, in any number), their own seed space, and backgrounds from PRETRAINING_BACKGROUNDS, colours
that no scene of tools.make_synthetic has. Every pretraining image shows its background (its
objects cannot cover the image), so none equals an image of any split of the task.

Deterministic: the same seed gives the same weights (one CPU thread, seeded generators; the
caller's torch random state is left as it was, so what it makes afterwards is unchanged).
"""

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F

from pipeline.model.images import normalize_pixels, pixel_table
from tools.make_synthetic import BACKGROUNDS, DOT_COLOURS, LARGE_COLOURS, SHAPES, SMALL_COLOURS, draw_shape

# Pretraining backgrounds: colours of no task palette, so no pretraining image is a task image.
PRETRAINING_BACKGROUNDS = {"beige": (235, 220, 180), "lavender": (190, 170, 240), "mint": (170, 240, 190),
                           "slate": (60, 70, 90)}
EXTRA_COLOURS = {"teal": (0, 128, 128), "gold": (255, 190, 60), "maroon": (120, 0, 30), "sky": (90, 170, 255)}
# Every colour a pretraining object may take: the task's palettes' and more, and the index of each
# is its class in the objective.
COLOURS = {**BACKGROUNDS, **LARGE_COLOURS, **SMALL_COLOURS, **DOT_COLOURS, **EXTRA_COLOURS, **PRETRAINING_BACKGROUNDS}
KINDS = ["background", *SHAPES]

STEPS = 300  # about a minute on one CPU core (the demo's budget: at most 2 minutes on 2 cores)
BATCH = 64
LR = 2e-3
SCENES = 8000  # rendered once; 300 steps of 64 see each about 2.4 times
HELD_OUT = 200  # scenes of another seed space, for the figures pretraining.json reports
SHOWN = 4  # held-out scenes pretraining.png shows with what the heads read in each patch
FEATURE_LAYER = -2  # the hidden state LLaVA-1.5 and this pipeline feed the projector (model.vision_feature_layer)


def pretraining_scene(rng: random.Random, size: int) -> tuple[str, list[tuple[str, int, int, int, str]]]:
    """(background colour, objects): objects (kind, x, y, side, colour) drawn in order, any of
    them over another: 0-2 large ones (16-32 px at 64 px), 0-2 medium (8-18 px), 1-6 tiny squares
    (3-8 px). Their areas add up to under the image's, so the background always shows."""
    background = rng.choice(sorted(PRETRAINING_BACKGROUNDS))
    colours = [c for c in COLOURS if c != background]
    scale = size / 64
    objects = []
    for count, low, high, kinds in ((rng.randint(0, 2), 16, 32, SHAPES), (rng.randint(0, 2), 8, 18, SHAPES),
                                    (rng.randint(1, 6), 3, 8, ["square"])):
        for _ in range(count):
            side = round(rng.randint(low, high) * scale)
            objects.append((rng.choice(kinds), rng.randint(0, size - side), rng.randint(0, size - side), side,
                            rng.choice(colours)))
    return background, objects


def render_with_labels(background: str, objects: list, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 pixels, and per pixel the index of its colour in COLOURS and of its kind in
    KINDS: the same shapes drawn into three canvases (PIL draws without antialiasing, so every
    pixel has exactly one object's colour)."""
    names = list(COLOURS)
    image = Image.new("RGB", (size, size), COLOURS[background])
    colour_map = Image.new("L", (size, size), names.index(background))
    kind_map = Image.new("L", (size, size), 0)
    draws = ImageDraw.Draw(image), ImageDraw.Draw(colour_map), ImageDraw.Draw(kind_map)
    for kind, x, y, side, colour in objects:
        for draw, fill in zip(draws, (COLOURS[colour], names.index(colour), KINDS.index(kind)), strict=True):
            draw_shape(draw, kind, (x, y, side), fill)
    return np.asarray(image), np.asarray(colour_map), np.asarray(kind_map)


def patch_majority(label_map: np.ndarray, patch: int, classes: int) -> np.ndarray:
    """(patches,) the label covering most of each patch (row-major; ties to the lower label)."""
    grid = label_map.shape[0] // patch
    blocks = label_map.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    counts = (blocks[:, :, None] == np.arange(classes)).sum(1)
    return counts.argmax(1)


def pretraining_set(count: int, seed_space: str, size: int,
                    patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """count scenes from the seed space: (count, 3, size, size) uint8 pixels, (count, patches)
    colour targets, (count, patches) kind targets."""
    rng = random.Random(seed_space)
    pixels, colours, kinds = [], [], []
    for _ in range(count):
        image, colour_map, kind_map = render_with_labels(*pretraining_scene(rng, size), size)
        pixels.append(torch.from_numpy(image.copy()).permute(2, 0, 1))
        colours.append(torch.from_numpy(patch_majority(colour_map, patch, len(COLOURS))))
        kinds.append(torch.from_numpy(patch_majority(kind_map, patch, len(KINDS))))
    return torch.stack(pixels), torch.stack(colours), torch.stack(kinds)


def warmup_cosine(steps: int):
    """LR multiplier per step: a linear warmup over a tenth of the steps, then a cosine to 0."""
    warmup = max(1, steps // 10)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return multiplier


class PatchHeads(nn.Module):
    """Linear heads from one hidden state: each patch's colour and kind logits."""

    def __init__(self, dim: int):
        super().__init__()
        self.colour = nn.Linear(dim, len(COLOURS))
        self.kind = nn.Linear(dim, len(KINDS))

    def loss(self, hidden: torch.Tensor, colours: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(self.colour(hidden).flatten(0, 1), colours.flatten())
                + F.cross_entropy(self.kind(hidden).flatten(0, 1), kinds.flatten()))


def features(tower: nn.Module, pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The feature layer's hidden state for uint8 pixels, normalized as the VLM normalizes them."""
    return tower(pixel_values=normalize_pixels(pixels, table), output_hidden_states=True).hidden_states[FEATURE_LAYER]


def pretrain_vision_tower(tower: nn.Module, image_processor, steps: int = STEPS, seed: int = 0,
                          scenes: int = SCENES, batch: int = BATCH, lr: float = LR,
                          held_out: int = HELD_OUT) -> dict:
    """Train the tower in place on the per-patch objective; returns what it learned: the heads'
    accuracy per patch on held-out scenes (colour on every patch and on the patches that objects
    cover most of, kind), the last step's loss, the seconds it took, and under "shown" the first
    SHOWN held-out scenes' pixels with the colour and kind the heads read in each patch (arrays,
    for write_report's figure)."""
    started = time.perf_counter()
    size, patch = tower.config.image_size, tower.config.patch_size
    table = pixel_table(image_processor)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order, so the same weights anywhere
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pixels, colours, kinds = pretraining_set(scenes, f"pretrain:{seed}", size, patch)
            heads = PatchHeads(tower.config.hidden_size)
            parameters = [*tower.parameters(), *heads.parameters()]
            optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
            order = torch.Generator().manual_seed(seed)
            tower.train()
            loss = torch.tensor(float("nan"))
            for _ in range(steps):
                index = torch.randint(0, scenes, (batch,), generator=order)
                loss = heads.loss(features(tower, pixels[index], table), colours[index], kinds[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            tower.eval()
            report = {"objective": f"per-patch majority colour and kind, linear heads on hidden state {FEATURE_LAYER}",
                      "steps": steps, "batch": batch, "lr": lr,
                      "scenes": scenes, "seed": seed, "final_loss": round(loss.item(), 4)}
            if held_out:
                report["held_out"], report["shown"] = held_out_accuracy(tower, heads, table, held_out, seed, size,
                                                                        patch)
    finally:
        torch.set_num_threads(threads)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


@torch.no_grad()
def held_out_accuracy(tower: nn.Module, heads: PatchHeads, table: torch.Tensor, count: int, seed: int, size: int,
                      patch: int) -> tuple[dict, dict]:
    """The feature layer's heads per patch on count scenes of a seed space of their own: their
    accuracies, and the first SHOWN scenes with the colour and kind read in each patch."""
    pixels, colours, kinds = pretraining_set(count, f"pretrain-held-out:{seed}", size, patch)
    hidden = features(tower, pixels, table)
    colour_read, kind_read = heads.colour(hidden).argmax(-1), heads.kind(hidden).argmax(-1)
    colour_right = colour_read == colours
    on_objects = kinds != 0  # patches mostly covered by an object, not by the background
    accuracy = {"scenes": count, "colour_accuracy": round(colour_right.float().mean().item(), 4),
                "object_patch_colour_accuracy": round(colour_right[on_objects].float().mean().item(), 4),
                "kind_accuracy": round((kind_read == kinds).float().mean().item(), 4)}
    shown = {"pixels": pixels[:SHOWN].permute(0, 2, 3, 1).numpy(), "colour": colour_read[:SHOWN].numpy(),
             "kind": kind_read[:SHOWN].numpy()}
    return accuracy, shown


def write_report(report: dict, folder: Path) -> None:
    """FOLDER/pretraining.json (the report's figures) and, after a held-out measurement,
    pretraining.png: held-out scenes beside the colour and the kind the heads read in each patch."""
    figures = {k: v for k, v in report.items() if k != "shown"}
    (Path(folder) / "pretraining.json").write_text(json.dumps(figures, indent=1) + "\n")
    if "shown" in report:
        plot_patches_read(report["shown"], figures["held_out"], Path(folder) / "pretraining.png")


def plot_patches_read(shown: dict, accuracy: dict, path: Path) -> None:
    """One row per scene: the image, each patch painted the colour its head reads, and each patch
    painted the kind read (a legend names them)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    palette = np.array(list(COLOURS.values()), dtype=np.uint8)
    kind_palette = np.array([(255, 255, 255), (230, 120, 0), (40, 90, 200), (30, 150, 60)], dtype=np.uint8)
    scenes, grid = shown["colour"].shape[0], math.isqrt(shown["colour"].shape[1])
    fig, axes = plt.subplots(scenes, 3, figsize=(7, 2.4 * scenes + 0.6), squeeze=False)
    titles = ("held-out scene", f"colour read per patch ({accuracy['colour_accuracy']:.0%} right)",
              f"kind read per patch ({accuracy['kind_accuracy']:.0%} right)")
    for row, axs in enumerate(axes):
        panels = (shown["pixels"][row], palette[shown["colour"][row]].reshape(grid, grid, 3),
                  kind_palette[shown["kind"][row]].reshape(grid, grid, 3))
        for ax, panel, title in zip(axs, panels, titles, strict=True):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.legend(handles=[Patch(facecolor=kind_palette[i] / 255, edgecolor="black", label=kind)
                        for i, kind in enumerate(KINDS)], loc="lower center", ncol=len(KINDS), fontsize=8)
    fig.suptitle(f"The tiny tower after pretraining, on held-out scenes ({accuracy['scenes']} measured)", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
