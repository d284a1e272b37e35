"""The Python blocks of README.md and docs/ run as written, in a folder set up as a reader's is after the commands
before them; their YAML blocks are valid configs.

At hand: ``path`` and ``model_dir`` (the checkpoint), ``peers`` (a swarm serving it, also in ``peers.txt``),
``best-prompt/`` (the best prompt of a search, exported), ``DIR/`` (a ``ptune`` prompt as a PEFT adapter) and
``runs/smollm2_bbc_news/mlflow.db`` (the search's store, its best prompt registered as ``smollm2-bbc-news``).
The tiny search of experiments/tiny.yaml stands in for the embedded default, except in the block that
prepares SmolLM2 itself.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptune_search.models.peft_adapter import write_peft_adapter
from ptune_search.models.prompt_folder import ExportedPrompt
from ptune_search.prompts.export import export_prompt
from ptune_search.swarm.launcher import LocalSwarm, write_peers_file
from tests.doc_pages import code_blocks
from tests.export.handmade_prompt import handmade_prompt

pytestmark = pytest.mark.slow

MODEL_NAME = "smollm2-bbc-news"
PYTHON_BLOCKS = code_blocks("python")


@pytest.fixture(scope="module")
def reader_folder(search_output: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    folder = tmp_path_factory.mktemp("reader")
    store = folder / "runs" / "smollm2_bbc_news"
    shutil.copytree(search_output, store, ignore=shutil.ignore_patterns("ray"))
    uri = f"sqlite:///{store / 'mlflow.db'}"
    register = ["ptune-search", "export", "--tracking-uri", uri, "--experiment", "tiny", "--register", MODEL_NAME]
    subprocess.run(register, check=True, capture_output=True)  # as the reader does, in a process of its own
    manifest = export_prompt(uri, folder / "best-prompt", experiment="tiny").manifest
    path = manifest.model_path
    write_peft_adapter(ExportedPrompt.read(handmade_prompt(Path(path), folder / "ptune", "ptune", 3)), folder / "DIR")
    with LocalSwarm(path, servers=2) as swarm:
        write_peers_file(folder / "peers.txt", swarm.initial_peers)
        yield folder, {"path": path, "model_dir": path, "peers": swarm.initial_peers}


def test_the_readme_and_the_docs_have_python_blocks() -> None:
    assert any(page.name == "README.md" for page, _ in PYTHON_BLOCKS)
    assert len(PYTHON_BLOCKS) >= 6


@pytest.mark.parametrize("page, block", PYTHON_BLOCKS, ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(PYTHON_BLOCKS)])
def test_python_block_runs(page: Path, block: str, reader_folder: tuple[Path, dict], monkeypatch) -> None:
    folder, names = reader_folder
    monkeypatch.chdir(folder)
    exec(compile(block, str(page), "exec"), dict(names))
