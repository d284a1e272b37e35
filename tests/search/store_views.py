"""Read-only views of what a search left in its MLflow and Optuna stores."""

from __future__ import annotations

from pathlib import Path

import optuna
from mlflow import MlflowClient
from mlflow.entities import Run

from ptune_search.search.sampler import TUNE_TRIAL_ID_ATTR
from ptune_search.search.tracking.records import ROLE_TAG, TRIAL_TAG


def mlflow_client(output_dir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{output_dir / 'mlflow.db'}")


def runs(output_dir: Path, experiment: str = "tiny") -> list[Run]:
    client = mlflow_client(output_dir)
    found = client.get_experiment_by_name(experiment)
    return list(client.search_runs([found.experiment_id])) if found else []


def runs_by_role(output_dir: Path, role: str) -> list[Run]:
    return [run for run in runs(output_dir) if run.data.tags.get(ROLE_TAG) == role]


def trial_runs(output_dir: Path) -> dict[str, Run]:
    return {run.data.tags[TRIAL_TAG]: run for run in runs_by_role(output_dir, "trial")}


def metric_steps(output_dir: Path, run: Run, key: str) -> list[int]:
    return sorted(m.step for m in mlflow_client(output_dir).get_metric_history(run.info.run_id, key))


def study_trials(output_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="search", storage=f"sqlite:///{output_dir / 'optuna.db'}").trials


def study_states(output_dir: Path) -> dict[str, str]:
    """Tune trial id (or ``#number`` for a study trial Tune never ran) -> Optuna state name."""
    return {
        trial.user_attrs.get(TUNE_TRIAL_ID_ATTR, f"#{trial.number}"): trial.state.name
        for trial in study_trials(output_dir)
    }
