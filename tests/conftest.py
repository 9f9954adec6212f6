"""Shared fixtures: tiny real models built once per test session (nothing is downloaded)."""

import warnings

import pytest

from tools.make_tiny_models import make_tiny_models

# torch 2.13 warns on every gloo collective; the tests look at results, not at these
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folder with vision/, qwen2/ and llama/ tiny random-init checkpoints."""
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))
