"""The docs site builds with warnings as errors, its config reference covers the typed config, and every YAML
block a reader may copy from README.md or docs/ is a valid config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from ptune_search.config import ExperimentConfig, parse_config
from ptune_search.config_reference import render_config_reference
from tests.doc_pages import ROOT, code_blocks

YAML_BLOCKS = code_blocks("yaml")


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for key, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) and not prefix:
            keys += config_keys(field.annotation, f"{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_every_config_key_has_a_description() -> None:
    undocumented = [key for key in config_keys(ExperimentConfig) if not _field(key).description]
    assert undocumented == []


def test_the_reference_names_every_key_with_its_default() -> None:
    reference, defaults = render_config_reference(), ExperimentConfig()
    for key in config_keys(ExperimentConfig):
        section, _, name = key.rpartition(".")
        assert not section or f"### `{section}`" in reference, section
        assert f"| `{name}` |" in reference, key
    assert f"| `max_steps` | integer | `{defaults.budget.max_steps}` |" in reference
    modes = ", ".join(f'"{mode}"' for mode in defaults.search_space.tuning_modes)
    assert f"| `tuning_modes` | list of ptune / deep_ptune | `[{modes}]` |" in reference


def test_the_docs_site_builds_strictly_with_the_reference(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    built = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    search_page = (site / "search" / "index.html").read_text()
    assert "<!-- config-reference -->" not in search_page
    assert "rung_validation_size" in search_page and "flush_timeout_s" in search_page


def test_there_are_yaml_blocks() -> None:
    assert any(page.name == "README.md" for page, _ in YAML_BLOCKS)


@pytest.mark.parametrize("page, block", YAML_BLOCKS, ids=[f"{p.name}-{i + 1}" for i, (p, _) in enumerate(YAML_BLOCKS)])
def test_yaml_block_is_a_valid_config(page: Path, block: str, tmp_path: Path) -> None:
    parse_config(yaml.safe_load(block), base_dir=tmp_path, check_paths=False)


def _field(dotted: str):
    model: type[BaseModel] = ExperimentConfig
    *sections, name = dotted.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name]
