from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI draws the same examples on every run, so a red CI is a regression, never a new draw; local runs keep
# exploring with fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from ptune_search.models.tiny_llama import make_tiny_llama  # noqa: E402 - after the hypothesis profile


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block Llama (hidden 64) with a byte-level tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
