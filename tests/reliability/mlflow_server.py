"""The ``mlflow_server`` fixture: a real ``mlflow server`` a test can kill and start again (see
benchmarks/search_harness/mlflow_server.py, shared with the chaos benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from benchmarks.search_harness.mlflow_server import MlflowServer, free_port

__all__ = ["MlflowServer", "free_port", "mlflow_server"]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A started server with its store in ``tmp_path/mlflow-server``; killed at teardown, also on failure."""
    server = MlflowServer(tmp_path / "mlflow-server")
    try:
        server.start()
        yield server
    finally:
        server.kill()
