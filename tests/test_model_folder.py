"""A converted model folder for plain transformers: its remote code loads it, from the folder or
as a hub repository, in a Python without this project; its README.md model card says what the
model is; a folder written by the code before pipeline/ was regrouped into packages still loads."""

import io
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

from pipeline.export.convert import probe_samples
from pipeline.export.model_card import EVALUATION_HEADING, set_evaluation
from pipeline.model.vlm import TokenFlexVLM
from tests.distributed import REPO

pytestmark = pytest.mark.timeout(600)
FLAT_PIPELINE = "05675c3"  # the last commit whose pipeline/ was flat (its remote code around model.py)

# Runs in a checkout of FLAT_PIPELINE's pipeline/ and stages/: writes a folder with that code, and its
# logits on the probe batch.
WRITE_WITH_THE_FLAT_PIPELINE = """
import sys
import torch
from pipeline.convert import probe_samples
from pipeline.model import TokenFlexVLM

vision, lm, out = sys.argv[1:]
torch.manual_seed(0)
model = TokenFlexVLM.from_components(vision, lm)
model.save_pretrained(out)
n = model.config.grid_side() ** 2
batch = model.labelled_batch(probe_samples(model.tokenizer, model.image_processor), n)
with torch.no_grad():
    torch.save({"n": n, "logits": model(batch, n, return_logits=True).logits}, out + "/probe.pt")
"""

# Runs with `python -I` in an empty folder: neither this project's checkout nor PYTHONPATH is on sys.path.
LOAD_WITH_TRANSFORMERS = """
import importlib.util, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText

assert importlib.util.find_spec("pipeline") is None, "the project is importable"
repository, probe_file, image_file, out_file = sys.argv[1:]  # a folder or a hub repository
model = AutoModel.from_pretrained(repository, trust_remote_code=True)
other = AutoModelForImageTextToText.from_pretrained(repository, trust_remote_code=True)
classes = [(type(m).__module__, type(m).__qualname__) for m in (model, other)]
probe = torch.load(probe_file)
with torch.no_grad():
    logits = model(probe["batch"], probe["n"], return_logits=True).logits
image = Image.open(image_file).convert("RGB")
answers = model.generate([image, None], ["What colour is the background?", "What is 2 plus 3?"],
                         num_vision_tokens=16, max_new_tokens=8)
torch.save({"logits": logits, "answers": answers, "classes": classes}, out_file)
"""


@pytest.fixture(scope="module")
def folder(stage1_run):
    """stage 1's final/, written by tools.convert_checkpoint's convert_checkpoint."""
    return stage1_run / "final"


@pytest.fixture(scope="module")
def hub_cache(folder, tmp_path_factory):
    """The folder as a hub repository tokenflex/tiny in a hub cache, as a download leaves it."""
    cache = tmp_path_factory.mktemp("hub")
    revision = "0123456789abcdef0123456789abcdef01234567"
    (cache / "models--tokenflex--tiny" / "refs").mkdir(parents=True)
    (cache / "models--tokenflex--tiny" / "refs" / "main").write_text(revision)
    shutil.copytree(folder, cache / "models--tokenflex--tiny" / "snapshots" / revision)
    return cache


@pytest.mark.parametrize("source", ["folder", "hub repository"])
def test_plain_transformers_loads_the_model_without_the_project(source, folder, hub_cache, synthetic_shards, tmp_path):
    model = TokenFlexVLM.from_pretrained(folder).eval()
    n = model.config.grid_side() ** 2
    batch = model.labelled_batch(probe_samples(model.tokenizer, model.image_processor), n)
    torch.save({"batch": batch, "n": n}, tmp_path / "probe.pt")
    image_file = sorted((synthetic_shards.parent / "raw" / "images").glob("*.png"))[0]
    repository = str(folder) if source == "folder" else "tokenflex/tiny"
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITH_TRANSFORMERS, repository, str(tmp_path / "probe.pt"), str(image_file),
         str(tmp_path / "out.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env=os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_CACHE": str(hub_cache),
                          "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    # both Auto classes give the model class of the folder's own code, copied by transformers
    (module, class_name), other = out["classes"]
    assert other == (module, class_name) and class_name == "TokenFlexModel"
    assert module.startswith("transformers_modules.") and module.endswith(".modeling_tokenflex")
    with torch.no_grad():
        assert torch.equal(out["logits"], model(batch, n, return_logits=True).logits)
    with Image.open(image_file) as image:
        expected = model.generate([image.convert("RGB"), None], ["What colour is the background?", "What is 2 plus 3?"],
                                  16, max_new_tokens=8)
    assert out["answers"] == expected


def test_model_card_says_what_the_model_is_and_how_to_load_it(folder, tiny_models):
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    assert f"| vision tower | SiglipVisionModel from `{tiny_models / 'vision'}` |" in card
    assert f"| language model | Qwen2ForCausalLM from `{tiny_models / 'qwen2'}` |" in card
    assert "| stage | Stage 1, align: train the projector only; the vision tower and the LM stay frozen. |" in card
    assert "| trained at N | 16, 64, 144 (drawn per step, weights 1:1:1) |" in card
    assert "| images | `pad` to 64×64 px, one tile each |" in card
    assert f"| steps | 16 of `{folder.parent}` |" in card
    assert "| serves | any N = n² with n ≤ 16" in card
    # the data: the checkpoint's mixture.json (the stage-1 run trains on conftest's two-source mixture)
    assert (
        "A mixture of 2 source(s) (shard folders from tools.build_shards), 270 samples an epoch, data.seed 0." in card
    )
    assert "| synthetic | 240 | 1 | 240 |\n| hard | 60 | 0.5 | 30 |" in card
    assert f'AutoModel.from_pretrained("{folder}", trust_remote_code=True' in card
    assert card.endswith(f"{EVALUATION_HEADING}\n\nNone yet: `python -m tools.benchmark {folder} --tasks ... "
                         "--model-card` writes it here.\n")


def test_set_evaluation_replaces_the_evaluation_section(folder, tmp_path):
    (tmp_path / "README.md").write_text((folder / "README.md").read_text())
    set_evaluation(tmp_path, "| model | N |\n|---|---|\n| a | 16 |\n")
    set_evaluation(tmp_path, "| model | N |\n|---|---|\n| a | 64 |\n")
    card = (tmp_path / "README.md").read_text()
    assert card.count(EVALUATION_HEADING) == 1 and "None yet" not in card and "| a | 16 |" not in card
    assert card.endswith(f"{EVALUATION_HEADING}\n\n| model | N |\n|---|---|\n| a | 64 |\n")
    assert card.startswith((folder / "README.md").read_text().split(EVALUATION_HEADING)[0])


def test_a_folder_written_before_the_packages_loads_with_the_same_logits(tiny_models, tmp_path):
    checkout = tmp_path / "flat"
    checkout.mkdir()
    archive = subprocess.run(["git", "archive", FLAT_PIPELINE, "pipeline", "stages"], cwd=REPO, capture_output=True,
                             check=True)
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(checkout, filter="data")
    written = subprocess.run([sys.executable, "-c", WRITE_WITH_THE_FLAT_PIPELINE, str(tiny_models / "vision"),
                              str(tiny_models / "qwen2"), str(tmp_path / "folder")],
                             cwd=checkout, capture_output=True, text=True, timeout=300, check=False)
    assert written.returncode == 0, written.stderr[-3000:]
    assert (tmp_path / "folder" / "model.py").is_file()  # the flat layout's remote code
    saved = torch.load(tmp_path / "folder" / "probe.pt")
    model = TokenFlexVLM.from_pretrained(tmp_path / "folder").eval()
    batch = model.labelled_batch(probe_samples(model.tokenizer, model.image_processor), saved["n"])
    with torch.no_grad():
        torch.testing.assert_close(model(batch, saved["n"], return_logits=True).logits, saved["logits"],
                                   rtol=0, atol=1e-5)
