"""``--resume`` goes on with the settings a search started with.

The search's start record (``<output_dir>/config.yaml`` and the parent run's params in MLflow) describes
every trial of it, so a resume whose settings differ would record trials under settings they did not run
with. It is refused, naming each changed field. Where the work runs may change between runs: the swarm
(``swarm.*``: its addresses change whenever it restarts) and how long the driver waits for MLflow.
"""

from __future__ import annotations

from typing import Any

from ptune_search.config import ExperimentConfig, load_config

CONFIG_FILE = "config.yaml"  # in output_dir: the settings the search started with
MAY_CHANGE_ON_RESUME = ("swarm.", "mlflow.flush_timeout_s")  # dotted fields, or prefixes ending in "."


def flat_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"budget": {"max_steps": 5}}`` -> ``{"budget.max_steps": 5}``: one MLflow param per config field."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_settings(config: ExperimentConfig) -> None:
    """Raise ValueError naming every field ``config`` changes against the settings its search started with."""
    stored_file = config.output_dir / CONFIG_FILE
    if not stored_file.exists():
        return
    stored = flat_settings(load_config(stored_file, check_paths=False).to_dict())
    current = flat_settings(config.to_dict())
    changed = [
        f"{key} ({_show(stored.get(key))} when it started, {_show(current.get(key))} now)"
        for key in sorted(stored.keys() | current.keys())
        if stored.get(key) != current.get(key) and not key.startswith(MAY_CHANGE_ON_RESUME)
    ]
    if changed:
        raise ValueError(
            f"--resume: the search in {config.output_dir} started with other settings: {'; '.join(changed)}. "
            f"Resume with the settings it started with (they are in {stored_file}), or start a new search "
            "in another output_dir"
        )


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value)
