"""The package's import graph, read from the source (every import, lazy ones inside functions included).

The rules of the house (docs/architecture.md): no import circle between modules, and arrows that run one way:
the CLI calls the search, the search uses models, models use the swarm client; a block server takes its
blocks from the models' family registry. So nothing in ``models/`` reaches the swarm's server side, and
nothing in ``swarm/`` reaches the search, Ray, Optuna or MLflow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ptune_search"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a
    module, else ``a.b``), and the third-party top-level packages it imports."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name if name in modules else name.split(".")[0] for name in found}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) - {module_name(path)} for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of the package's modules (as a path that ends where it starts), or [] if none."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str]:
        state[module], _ = "open", stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module], _ = "done", stack.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


FORBIDDEN = [
    ("ptune_search.models", "ptune_search.swarm.server"),
    ("ptune_search.models", "ptune_search.search"),
    ("ptune_search.models", "ptune_search.prompts"),  # the prompt-folder format lives in models/
    ("ptune_search.swarm", "ptune_search.search"),
    ("ptune_search.swarm", "ray"),
    ("ptune_search.swarm", "optuna"),
    ("ptune_search.swarm", "mlflow"),
    ("ptune_search.config", "ptune_search.search"),
    ("ptune_search.prompts", "ptune_search.search"),  # shared MLflow tag names live in prompts.run_tags
    ("ptune_search.pretrained", "ptune_search.models"),  # checkpoints come from below the model classes
    ("ptune_search.config", "ptune_search.swarm.launcher"),  # the layout rule lives in swarm.replica_layout
    ("ptune_search.training", "ptune_search.search"),  # one process's training: no Ray, Optuna or MLflow
    ("ptune_search.training", "ray"),
    ("ptune_search.training", "optuna"),
    ("ptune_search.training", "mlflow"),
]
FAMILIES = sorted(path.parent.name for path in (PACKAGE / "models").glob("*/__init__.py"))
for family in FAMILIES:  # a server and the prompt format reach families only through the registry
    FORBIDDEN += [
        ("ptune_search.swarm", f"ptune_search.models.{family}"),
        ("ptune_search.models.prompt_folder", f"ptune_search.models.{family}"),
    ]


def test_the_package_has_no_import_circle() -> None:
    assert find_cycle(import_graph()) == []


@pytest.mark.parametrize(("source", "target"), FORBIDDEN, ids=[f"{s}->{t}" for s, t in FORBIDDEN])
def test_arrows_run_one_way(source: str, target: str) -> None:
    wrong = sorted(
        f"{module} imports {imported}"
        for module, imports in import_graph().items()
        if module == source or module.startswith(f"{source}.")
        for imported in imports
        if imported == target or imported.startswith(f"{target}.")
    )
    assert wrong == []


def test_the_checker_sees_a_circle_and_a_lazy_import(tmp_path: Path) -> None:
    """The graph reads imports inside functions, and a circle through them is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    lazy = PACKAGE / "models" / "llama" / "model.py"
    assert any(name.startswith("ptune_search.swarm.client") for name in import_graph()[module_name(lazy)])


MAX_FUNCTION_LINES = 60


def test_no_function_runs_over_sixty_lines() -> None:
    """A reader follows a function on one screen; a longer one holds parts that deserve names."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
