"""What a finished search left behind, compared store against store: Tune's own results (``result.json`` of each
trial) against the MLflow runs, and MLflow run statuses against the Optuna study's trial states."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient

from ptune_search.search.sampler import TUNE_TRIAL_ID_ATTR
from ptune_search.search.tracking.records import ROLE_TAG, TRIAL_TAG
from ptune_search.search.tune_runs import SEARCH_NAME

OPTUNA_STATE_OF_RUN = {"FINISHED": "COMPLETE", "KILLED": "PRUNED", "FAILED": "FAIL"}


def search_figures(output_dir: Path, tracking_uri: str, experiment: str, driver_log: str) -> dict[str, Any]:
    """Trials by outcome, Tune's trial failures and restores, MLflow steps lost or duplicated against Tune's
    results, and trials whose Optuna state disagrees with their MLflow status."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    trial_runs = {run.data.tags[TRIAL_TAG]: run for run in runs if run.data.tags.get(ROLE_TAG) == "trial"}
    tune_steps = _tune_steps(output_dir / "ray" / SEARCH_NAME)
    lost, duplicated = 0, 0
    for trial_id, expected in tune_steps.items():
        run = trial_runs.get(trial_id)
        for key, steps in expected.items():
            logged = [m.step for m in client.get_metric_history(run.info.run_id, key)] if run else []
            lost += len(steps - set(logged))
            duplicated += sum(count - 1 for count in Counter(logged).values())
    study = optuna.load_study(study_name=SEARCH_NAME, storage=f"sqlite:///{output_dir / 'optuna.db'}")
    states = {trial.user_attrs.get(TUNE_TRIAL_ID_ATTR, f"#{trial.number}"): trial.state.name for trial in study.trials}
    statuses = {trial_id: run.info.status for trial_id, run in trial_runs.items()}
    inconsistent = sorted(
        f"{trial_id}: MLflow {statuses.get(trial_id)}, Optuna {states.get(trial_id)}"
        for trial_id in statuses.keys() | states.keys()
        if OPTUNA_STATE_OF_RUN.get(statuses.get(trial_id, "")) != states.get(trial_id)
    )
    failures = [path.read_text().count("Failure # ") for path in (output_dir / "ray" / SEARCH_NAME).glob("*/error.txt")]
    return {
        "trials": len(tune_steps),
        "trials_by_mlflow_status": dict(Counter(statuses.values())),
        "trials_by_optuna_state": dict(Counter(states.values())),
        "trial_failures": sum(failures),  # Tune retried the trial from its last checkpoint
        "trials_failed": sum(status == "FAILED" for status in statuses.values()),
        "restores": len(re.findall(r"resumed trial at step \d+", driver_log)),
        "mlflow_steps_expected": sum(len(steps) for expected in tune_steps.values() for steps in expected.values()),
        "mlflow_steps_lost": lost,
        "mlflow_steps_duplicated": duplicated,
        "mlflow_runs_duplicated": len([run for run in runs if run.data.tags.get(ROLE_TAG) == "trial"])
        - len(trial_runs),
        "optuna_mlflow_inconsistent": inconsistent,
        "driver_tracebacks": driver_log.count("Traceback"),
    }


def _tune_steps(experiment_dir: Path) -> dict[str, dict[str, set[int]]]:
    """Trial id -> metric -> the steps Tune's results hold (``train_loss``: one per optimizer step)."""
    steps: dict[str, dict[str, set[int]]] = {}
    for result_file in experiment_dir.glob("*/result.json"):
        for line in result_file.read_text().splitlines():
            result = json.loads(line)
            expected = steps.setdefault(result["trial_id"], {"val_accuracy": set(), "train_loss": set()})
            step, losses = int(result["step"]), result.get("train_losses", [])
            expected["val_accuracy"].add(step)
            expected["train_loss"].update(range(step - len(losses) + 1, step + 1))
    return steps
