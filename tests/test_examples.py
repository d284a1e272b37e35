"""Every ``Example::`` block in the package's docstrings runs, so that what a reader copies works.

An example runs in its own module's namespace (the names it documents are at hand, as for a reader of that
module) plus these, made once here: ``path``, a tiny generated Llama checkpoint; ``initial_peers``, a
2-server swarm on loopback serving it; ``workdir``, an empty folder that is also the working directory.
Top-level ``await`` is allowed (the example then runs in an event loop), and ``...`` stands for the reader's
own code.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptune_search.swarm.launcher import LocalSwarm

PACKAGE = Path(__file__).resolve().parents[1] / "ptune_search"


def docstring_examples() -> Iterator[tuple[str, str, str]]:
    """(module, where, code) for each ``Example::`` block: the indented lines after it, dedented."""
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node, clean=True)
            for match in re.finditer(r"Example::\n\n((?:    .*\n|\n)+)", f"{doc}\n" if doc else ""):
                where = f"{module}:{getattr(node, 'name', '<module>')}"
                yield module, where, textwrap.dedent(match.group(1))


EXAMPLES = list(docstring_examples())


@pytest.fixture(scope="module")
def tiny_swarm(tiny_model_path: Path) -> Iterator[LocalSwarm]:
    with LocalSwarm(tiny_model_path, servers=2) as swarm:
        yield swarm


def run_example(code: str, namespace: dict) -> None:
    compiled = compile(code, "<example>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)
    if inspect.iscoroutine(result):
        asyncio.run(result)


def test_every_example_is_found() -> None:
    assert len(EXAMPLES) >= 8, [where for _, where, _ in EXAMPLES]


@pytest.mark.slow
@pytest.mark.parametrize(("module", "where", "code"), EXAMPLES, ids=[where for _, where, _ in EXAMPLES])
def test_docstring_example_runs(
    module: str, where: str, code: str, tiny_model_path: Path, tiny_swarm: LocalSwarm, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = dict(vars(importlib.import_module(module)))
    namespace.update(path=str(tiny_model_path), initial_peers=tiny_swarm.initial_peers, workdir=tmp_path)
    run_example(code, namespace)
