"""Exit 0 when this Python already has every pin of pyproject.toml (dependencies and the test extra, with the
extras they name) and the requirements given as arguments; else print the first one missing and exit 1.

`.ci/install` then only reinstalls the project itself (a cluster node set up before, a machine where CI ran),
which takes seconds instead of a resolution over 200 packages. Standard library and pip's vendored packaging
only: it runs before anything is installed.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement


def missing(requirement: Requirement, extra: str = "") -> str | None:
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
        return None
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return f"{requirement} (not installed)"
    if not requirement.specifier.contains(version, prereleases=True):
        return f"{requirement} (installed: {version})"
    for name in requirement.extras:  # ray[default,tune]: what those extras pull in
        for text in metadata.requires(requirement.name) or []:
            problem = missing(Requirement(text), name)
            if problem:
                return f"{problem}, for {requirement.name}[{name}]"
    return None


def main() -> int:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    texts = [*project["dependencies"], *project["optional-dependencies"]["test"], *sys.argv[1:]]
    for text in texts:
        problem = missing(Requirement(text))
        if problem:
            print(f"not installed yet: {problem}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
