from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import pytest

from tests.search.search_process import TINY_CONFIG, SearchProcess


@pytest.fixture
def run_search(tmp_path: Path):
    """Start searches on experiments/tiny.yaml (or another config) with output in ``tmp_path``."""
    started: list[SearchProcess] = []

    def start(
        overrides: Sequence[str] = (),
        config: Path = TINY_CONFIG,
        extra_args: Sequence[str] = (),
        output_dir: Optional[Path] = None,
    ) -> SearchProcess:
        output = output_dir or tmp_path / "search"
        search = SearchProcess(config, [f"output_dir={output}", *overrides], tmp_path / "driver.log", extra_args)
        started.append(search)
        return search

    yield start
    for search in started:
        search.kill_everything()
