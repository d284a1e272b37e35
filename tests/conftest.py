from __future__ import annotations

from pathlib import Path

import pytest

from ptune_search.tiny_llama import make_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block Llama (hidden 64) with a byte-level tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
