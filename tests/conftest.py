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

from ptune_search.tiny_llama import make_tiny_llama  # noqa: E402 - after the hypothesis profile


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block Llama (hidden 64) with a byte-level tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def search_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny search (2 trials, no baseline) that the export, MLflow model and browser tests all read; its
    driver's output is in ``driver.log`` beside it."""
    from tests.search.search_process import TINY_CONFIG, SearchProcess

    output = tmp_path_factory.mktemp("tiny-search") / "search"
    overrides = [f"output_dir={output}", "budget.num_samples=2", "baseline=false"]
    search = SearchProcess(TINY_CONFIG, overrides, output.parent / "driver.log")
    try:
        assert search.wait(timeout=900) == 0, search.log()[-5000:]
    finally:
        search.kill_everything()
    return output
