"""MLflow records of a search, written by the driver alone: a parent run and one child run per trial.

Trials never talk to MLflow: they report to Tune, and :class:`MlflowTrialCallback` (a Tune callback in
the driver) turns those reports into runs, metric histories and artifacts. One writer means trials on
other nodes need no access to the store, and a resumed search finds its runs again by tag instead of
creating duplicates.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

SEARCH_TAG = "ptune_search.search_dir"
TRIAL_TAG = "ptune_search.trial_id"
ROLE_TAG = "ptune_search.role"
BEST_TAG = "ptune_search.best"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
SEARCHED_PARAMS = ("tuning_mode", "pre_seq_len", "lr")
TRIAL_ARTIFACTS = ("prompt.safetensors", "head.safetensors", "ptune_config.json")
STEP_METRICS = ("val_loss", "val_accuracy", "tokens_per_s")


def project_git_commit() -> str:
    """The commit of the checkout this package runs from, or "unknown" outside a git checkout."""
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return "unknown"
    return completed.stdout.strip() if completed.returncode == 0 else "unknown"


class SearchTracker:
    """The MLflow side of one search: finds or creates the parent run and the children of its trials."""

    def __init__(self, tracking_uri: str, experiment_name: str, search_dir: Path, artifact_root: Optional[Path]):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.search_dir = str(search_dir)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = artifact_root.as_uri() if artifact_root is not None else None
            self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id
        self.parent_run_id: Optional[str] = None

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the run; the client (with its DB engine) is rebuilt on restore."""
        return {key: value for key, value in self.__dict__.items() if key != "client"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.client = MlflowClient(self.tracking_uri)

    def start_parent(self, run_name: str, params: dict[str, Any], config_file: Path) -> str:
        """Reuse the parent of an earlier, interrupted run of the same search directory (resume)."""
        existing = self._runs(f"tags.`{SEARCH_TAG}` = '{self.search_dir}' and tags.`{ROLE_TAG}` = 'search'")
        if existing:
            self.parent_run_id = existing[0].info.run_id
            self.client.update_run(self.parent_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return self.parent_run_id
        tags = {SEARCH_TAG: self.search_dir, ROLE_TAG: "search", GIT_COMMIT_TAG: project_git_commit()}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        self.parent_run_id = run.info.run_id
        self.client.log_batch(self.parent_run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.log_artifact(self.parent_run_id, str(config_file))
        return self.parent_run_id

    def child_run_id(self, trial_id: str) -> Optional[str]:
        existing = self._runs(f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{SEARCH_TAG}` = '{self.search_dir}'")
        return existing[0].info.run_id if existing else None

    def child_run(self, trial_id: str, run_name: str, params: dict[str, Any], role: str = "trial") -> str:
        """The trial's child run, created on its first start only (a retried or resumed trial keeps its run)."""
        existing = self.child_run_id(trial_id)
        if existing is not None:
            self.client.update_run(existing, status=RunStatus.to_string(RunStatus.RUNNING))
            return existing
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, TRIAL_TAG: trial_id, SEARCH_TAG: self.search_dir, ROLE_TAG: role}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def last_logged_step(self, run_id: str) -> int:
        history = self.client.get_metric_history(run_id, "val_loss")
        return max((metric.step for metric in history), default=0)

    def log_result(self, run_id: str, result: dict[str, Any]) -> None:
        """Per-step histories: each training step's loss, and the evaluation metrics at the window's end."""
        step, now = int(result["step"]), int(time.time() * 1000)
        losses = result.get("train_losses", [])
        metrics = [Metric("train_loss", float(loss), now, step - len(losses) + 1 + i) for i, loss in enumerate(losses)]
        metrics += [Metric(key, float(result[key]), now, step) for key in STEP_METRICS if key in result]
        self.client.log_batch(run_id, metrics=metrics)

    def finish_child(self, run_id: str, status: RunStatus, checkpoint_dir: Optional[Path]) -> None:
        if checkpoint_dir is not None:
            for name in TRIAL_ARTIFACTS:
                if (checkpoint_dir / name).is_file():
                    self.client.log_artifact(run_id, str(checkpoint_dir / name))
        self.client.set_terminated(run_id, status=RunStatus.to_string(status))

    def finish_parent(self, best_run_id: Optional[str], summary: dict[str, float], files: list[Path]) -> None:
        if best_run_id is not None:
            self.client.set_tag(best_run_id, BEST_TAG, "true")
            self.client.set_tag(self.parent_run_id, "best_run_id", best_run_id)
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in summary.items()])
        for file in files:
            self.client.log_artifact(self.parent_run_id, str(file))
        self.client.set_terminated(self.parent_run_id, status=RunStatus.to_string(RunStatus.FINISHED))

    def abort(self) -> None:
        """An interrupted search: its parent and still-running children become KILLED until resumed."""
        running = self._runs(f"tags.`{SEARCH_TAG}` = '{self.search_dir}' and attributes.status = 'RUNNING'")
        for run in running:
            self.client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))

    def _runs(self, filter_string: str) -> list:
        return list(self.client.search_runs([self.experiment_id], filter_string, order_by=["attributes.start_time DESC"]))


def trial_params(trial: "Trial", static_params: dict[str, Any]) -> dict[str, Any]:
    params = {key: trial.config[key] for key in SEARCHED_PARAMS if key in trial.config}
    return {**params, **static_params}


class MlflowTrialCallback(tune.Callback):
    """Turns Tune's trial events in the driver into child runs of the tracker's parent run."""

    def __init__(self, tracker: SearchTracker, static_params: dict[str, Any], role: str = "trial"):
        self.tracker = tracker
        self.static_params = static_params
        self.role = role
        self.run_ids: dict[str, str] = {}
        self.logged_steps: dict[str, int] = {}
        self.checkpoints: dict[str, tune.Checkpoint] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: "Trial", result: dict, **info: Any) -> None:
        """Each step once: a trial retried from an older checkpoint, or a resumed one, replays some steps."""
        run_id = self._run_id(trial)
        if trial.trial_id not in self.logged_steps:
            self.logged_steps[trial.trial_id] = self.tracker.last_logged_step(run_id)
        if result["step"] > self.logged_steps[trial.trial_id]:
            self.tracker.log_result(run_id, result)
            self.logged_steps[trial.trial_id] = result["step"]

    def on_checkpoint(self, iteration: int, trials: list, trial: "Trial", checkpoint: tune.Checkpoint, **info: Any) -> None:
        self.checkpoints[trial.trial_id] = checkpoint

    def on_trial_complete(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
        finished = bool((trial.last_result or {}).get("finished"))
        self._finish(trial, RunStatus.FINISHED if finished else RunStatus.KILLED)

    def on_trial_error(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
        self._finish(trial, RunStatus.FAILED)

    def _run_id(self, trial: "Trial") -> str:
        if trial.trial_id not in self.run_ids:
            params = trial_params(trial, self.static_params)
            self.run_ids[trial.trial_id] = self.tracker.child_run(trial.trial_id, str(trial), params, self.role)
        return self.run_ids[trial.trial_id]

    def _finish(self, trial: "Trial", status: RunStatus) -> None:
        checkpoint = self.checkpoints.get(trial.trial_id) or trial.checkpoint
        if checkpoint is None:
            self.tracker.finish_child(self._run_id(trial), status, None)
            return
        with checkpoint.as_directory() as folder:
            self.tracker.finish_child(self._run_id(trial), status, Path(folder))
