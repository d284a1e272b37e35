"""MLflow records of a search, written by the driver alone: a parent run and one child run per trial.

Trials never talk to MLflow: they report to Tune, and :class:`MlflowTrialCallback` (a Tune callback in
the driver) turns those reports into records in a :class:`~ptune_search.search.tracking.outbox.TrackingOutbox`;
the driver's :class:`~ptune_search.search.tracking.sender.OutboxSender` hands them to :class:`SearchTracker`,
which writes runs, metric histories and artifacts whenever the store answers. One writer means trials on
other nodes need no access to the store, and a resumed search finds its runs again by tag instead of
creating duplicates.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE
from ray import tune

from ptune_search.models.prompt_folder import TRIAL_ARTIFACTS
from ptune_search.prompts.run_tags import BEST_TAG, ROLE_TAG, TRIAL_TAG
from ptune_search.search.tracking.filters import tag_clause, tagged
from ptune_search.search.tracking.outbox import OutboxRecord, TrackingOutbox
from ptune_search.search.tracking.task_dataset import TaskDatasetInput

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

SEARCH_TAG = "ptune_search.search_dir"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# What kind of experiment this is, for MLflow 3's UI (model training, not GenAI); the view it opens on is a
# per-browser setting that only the URL query WORKFLOW_QUERY overrides (see experiment_runs_url).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
WORKFLOW_QUERY = "workflowType=machine_learning"
SEARCHED_PARAMS = ("tuning_mode", "pre_seq_len", "lr", "prompt_init", "head", "bare_text")
STEP_METRICS = ("val_loss", "val_accuracy", "eval_loss", "eval_accuracy", "best_step", "tokens_per_s", "baseline_lr")


def project_git_commit() -> str:
    """The commit of the checkout this package runs from, or "unknown" outside a git checkout."""
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return "unknown"
    return completed.stdout.strip() if completed.returncode == 0 else "unknown"


def experiment_runs_url(tracking_uri: str, experiment_id: str, ui_url: str = "http://127.0.0.1:5000") -> str:
    """Where the experiment's runs open in the MLflow UI's model-training view (not its GenAI overview).

    A tracking server serves the UI itself; a database store needs ``mlflow ui`` on it first, at ``ui_url``.
    """
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else ui_url
    return f"{base}/#/experiments/{experiment_id}?{WORKFLOW_QUERY}"


def how_to_open_runs(tracking_uri: str, experiment_id: str) -> str:
    """The line the search's summary prints: the runs URL, and for a database store the command to serve it."""
    url = experiment_runs_url(tracking_uri, experiment_id)
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow runs: {url}"
    return f"MLflow runs: run `mlflow ui --backend-store-uri {tracking_uri}`, then open {url}"


class PromptRegistrar(Protocol):
    """Logs trial run ``run_id``'s prompt as a model of search run ``parent_run_id`` and registers it under
    ``registered_name``, once per search (see :func:`ptune_search.prompts.mlflow_model.register_search_prompt`)."""

    def __call__(self, tracking_uri: str, parent_run_id: str, run_id: str, registered_name: str) -> None: ...


class SearchTracker:
    """The MLflow side of one search: the parent run, and the outbox's records written to the trials' runs.

    Every record is idempotent, so one whose answer was lost can be written again: runs are found by tag
    before one is created, and a result whose step the run already has is skipped (after a failed write,
    :meth:`forget_store_state` makes the next one read the store again).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        search_dir: Path,
        artifact_root: Optional[Path],
        register_prompt: Optional[PromptRegistrar] = None,
    ):
        self.tracking_uri = tracking_uri
        self.register_prompt = register_prompt
        self.client = MlflowClient(tracking_uri)
        self.search_dir = str(search_dir)
        try:
            experiment = self.client.get_experiment_by_name(experiment_name)
        except MlflowException as error:
            raise ConnectionError(
                f"MLflow at {tracking_uri} does not answer ({str(error)[:300]}); start the store or set "
                "mlflow.tracking_uri to one that answers"
            ) from None
        if experiment is None:
            location = artifact_root.as_uri() if artifact_root is not None else None
            self.experiment_id = self.client.create_experiment(
                experiment_name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        else:
            self.experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.parent_run_id: Optional[str] = None
        self._run_ids: dict[str, str] = {}  # Tune trial id -> run id, as the store answered
        self._last_steps: dict[str, int] = {}  # run id -> last logged step, as read from the store

    def start_parent(
        self, run_name: str, params: dict[str, Any], config_file: Path, datasets: Sequence[TaskDatasetInput] = ()
    ) -> str:
        """Reuse the parent of an earlier, interrupted run of the same search directory (resume)."""
        existing = self._runs({SEARCH_TAG: self.search_dir, ROLE_TAG: "search"})
        if existing:
            self.parent_run_id = existing[0].info.run_id
            self.client.update_run(self.parent_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return self.parent_run_id
        tags = {
            SEARCH_TAG: self.search_dir,
            ROLE_TAG: "search",
            GIT_COMMIT_TAG: project_git_commit(),
            MLFLOW_SOURCE_NAME: search_source_name(),
            MLFLOW_SOURCE_TYPE: "LOCAL",
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        self.parent_run_id = run.info.run_id
        self.client.log_batch(self.parent_run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.log_artifact(self.parent_run_id, str(config_file))
        if datasets:
            self.client.log_inputs(self.parent_run_id, datasets=[dataset.to_mlflow() for dataset in datasets])
        return self.parent_run_id

    def write(self, record: OutboxRecord) -> None:
        """Apply one outbox record (see :class:`MlflowTrialCallback` and ``run_search`` for what they hold)."""
        args = record.args
        match record.operation:
            case "start_child":
                run_id = self.child_run(
                    args["trial_id"], args["run_name"], args["params"], args["role"], args["parent_run_id"]
                )
                datasets = [TaskDatasetInput.from_json(fields).to_mlflow() for fields in args.get("datasets", [])]
                if datasets:  # logging the same inputs again changes nothing: the store keeps one of each
                    self.client.log_inputs(run_id, datasets=datasets)
            case "log_result":
                self.log_result(args["trial_id"], args["step"], args["metrics"])
            case "finish_child":
                self.finish_child(args["trial_id"], RunStatus.from_string(args["status"]), list(record.files))
            case "register_model":
                self.register_model(args["parent_run_id"], args["best_trial_id"], args["registered_model_name"])
            case "finish_parent":
                for trial_id, metrics in args.get("trial_metrics", {}).items():
                    self.log_final_metrics(trial_id, metrics)
                self.finish_parent(args["parent_run_id"], args["best_trial_id"], args["summary"], list(record.files))
            case "drop_ghost_runs":
                self.drop_ghost_runs(args["role"], set(args["known_trial_ids"]))
            case "abort":
                self.abort()
            case _:
                raise ValueError(f"unknown outbox operation {record.operation!r} in record {record.seq}")

    def forget_store_state(self) -> None:
        self._last_steps.clear()

    def child_run_id(self, trial_id: str) -> Optional[str]:
        if trial_id not in self._run_ids:
            existing = self._runs({TRIAL_TAG: trial_id, SEARCH_TAG: self.search_dir})
            if not existing:
                return None
            self._run_ids[trial_id] = existing[0].info.run_id
        return self._run_ids[trial_id]

    def child_run(self, trial_id: str, run_name: str, params: dict[str, Any], role: str, parent_run_id: str) -> str:
        """The trial's child run, created on its first start only (a retried or resumed trial keeps its run)."""
        run_id = self.child_run_id(trial_id)
        if run_id is None:
            tags = {
                MLFLOW_PARENT_RUN_ID: parent_run_id,
                TRIAL_TAG: trial_id,
                SEARCH_TAG: self.search_dir,
                ROLE_TAG: role,
            }
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name).info.run_id
            self._run_ids[trial_id] = run_id
        else:
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        # Also on a found run: the answer to an earlier create may have been lost before its params were sent.
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run_id

    def last_logged_step(self, run_id: str) -> int:
        history = self.client.get_metric_history(run_id, "val_loss")
        return max((metric.step for metric in history), default=0)

    def log_result(self, trial_id: str, step: int, metrics: list[list]) -> None:
        """A result's ``[key, value, timestamp, step]`` metrics, unless the run has its step already."""
        run_id = self._trial_run(trial_id)
        if run_id not in self._last_steps:
            self._last_steps[run_id] = self.last_logged_step(run_id)
        if step <= self._last_steps[run_id]:
            return
        batch = [Metric(key, float(value), int(timestamp), int(at)) for key, value, timestamp, at in metrics]
        self.client.log_batch(run_id, metrics=batch)
        self._last_steps[run_id] = step

    def finish_child(self, trial_id: str, status: RunStatus, artifacts: list[Path]) -> None:
        run_id = self._trial_run(trial_id)
        for file in artifacts:
            self.client.log_artifact(run_id, str(file))
        self.client.set_terminated(run_id, status=RunStatus.to_string(status))

    def log_final_metrics(self, trial_id: str, metrics: dict[str, list]) -> None:
        """Figures measured after the search (the held-out test split) on a trial's run, each once."""
        run_id = self._trial_run(trial_id)
        logged = self.client.get_run(run_id).data.metrics
        batch = [Metric(k, float(v), int(ts), 0) for k, (v, ts) in metrics.items() if logged.get(k) != v]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def finish_parent(
        self, parent_run_id: str, best_trial_id: Optional[str], summary: dict[str, list], files: list[Path]
    ) -> None:
        """``summary`` maps a metric to ``[value, timestamp]``; a value the run already has is not logged twice."""
        if best_trial_id is not None:
            best_run_id = self._trial_run(best_trial_id)
            self.client.set_tag(best_run_id, BEST_TAG, "true")
            self.client.set_tag(parent_run_id, "best_run_id", best_run_id)
        logged = self.client.get_run(parent_run_id).data.metrics
        metrics = [Metric(k, float(v), int(ts), 0) for k, (v, ts) in summary.items() if logged.get(k) != v]
        self.client.log_batch(parent_run_id, metrics=metrics)
        for file in files:
            self.client.log_artifact(parent_run_id, str(file))
        self.client.set_terminated(parent_run_id, status=RunStatus.to_string(RunStatus.FINISHED))

    def register_model(self, parent_run_id: str, best_trial_id: str, registered_model_name: str) -> None:
        """The best trial's prompt as a pyfunc model of the search run, registered once per search."""
        if self.register_prompt is None:
            raise ValueError("this tracker was built without register_prompt; it cannot register a model")
        self.register_prompt(self.tracking_uri, parent_run_id, self._trial_run(best_trial_id), registered_model_name)

    def drop_ghost_runs(self, role: str, known_trial_ids: set[str]) -> None:
        """Delete the ``role`` runs of trials a resumed Tune run does not know, if they logged nothing: a driver
        killed between a trial's start and Tune's next snapshot leaves a run no trial will ever write to
        (the study marks the same trial FAIL, see ``InOrderPrunedOptunaSearcher.restore``)."""
        for run in self._runs({SEARCH_TAG: self.search_dir, ROLE_TAG: role}):
            trial_id = run.data.tags[TRIAL_TAG]
            if trial_id not in known_trial_ids and not run.data.metrics:
                logger.warning("trial %s never ran past its start (driver killed); deleting its run", trial_id)
                self.client.delete_run(run.info.run_id)
                self._run_ids.pop(trial_id, None)

    def abort(self) -> None:
        """An interrupted search: its parent and still-running children become KILLED until resumed."""
        running = self._runs({SEARCH_TAG: self.search_dir}, "attributes.status = 'RUNNING'")
        for run in running:
            self.client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))

    def _trial_run(self, trial_id: str) -> str:
        run_id = self.child_run_id(trial_id)
        if run_id is None:
            raise MlflowException(f"no run of trial {trial_id} in search {self.search_dir}", RESOURCE_DOES_NOT_EXIST)
        return run_id

    def _runs(self, tags: dict[str, str], *clauses: str) -> list:
        """This experiment's runs with exactly these tags (values may hold quotes), newest first."""
        filter_string = " and ".join([*(tag_clause(key, value) for key, value in tags.items()), *clauses])
        runs = self.client.search_runs([self.experiment_id], filter_string, order_by=["attributes.start_time DESC"])
        return tagged(runs, tags)


def search_source_name() -> str:
    """The program that ran the search, as MLflow names a run's source (the entry point's path)."""
    return str(Path(sys.argv[0]).resolve()) if sys.argv and sys.argv[0] else "ptune-search"


def trial_params(trial: "Trial", static_params: dict[str, Any]) -> dict[str, Any]:
    params = {key: trial.config[key] for key in SEARCHED_PARAMS if key in trial.config}
    return {**params, **static_params}


class MlflowTrialCallback(tune.Callback):
    """Turns Tune's trial events in the driver into outbox records for child runs of the search's parent run.

    It never waits for MLflow: appending a record is a local file write. Tune pickles its callbacks with the
    run; the outbox pickles as its directory and reattaches to the open one when a search is resumed.
    """

    def __init__(
        self,
        outbox: TrackingOutbox,
        parent_run_id: str,
        static_params: dict[str, Any],
        datasets: list[TaskDatasetInput],
        role: str = "trial",
    ):
        self.outbox = outbox
        self.parent_run_id = parent_run_id
        self.static_params = static_params
        self.datasets = datasets
        self.role = role
        self.started: set[str] = set()
        self.checkpoints: dict[str, tune.Checkpoint] = {}

    def drop_ghost_runs(self, known_trial_ids: set[str]) -> None:
        """Before a resumed Tune run: its trials are ``known_trial_ids``; runs of others are ghosts."""
        self.outbox.append("drop_ghost_runs", {"role": self.role, "known_trial_ids": sorted(known_trial_ids)})

    def on_trial_start(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
        self._start(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: "Trial", result: dict, **info: Any) -> None:
        """Per-step histories: each training step's loss, and the evaluation metrics at the window's end.

        A trial retried from an older checkpoint, or a resumed one, replays some steps: the tracker skips them.
        """
        self._start(trial)
        step, now = int(result["step"]), int(time.time() * 1000)
        losses = result.get("train_losses", [])
        metrics = [["train_loss", float(loss), now, step - len(losses) + 1 + i] for i, loss in enumerate(losses)]
        metrics += [[key, float(result[key]), now, step] for key in STEP_METRICS if key in result]
        self.outbox.append("log_result", {"trial_id": trial.trial_id, "step": step, "metrics": metrics})

    def on_checkpoint(
        self, iteration: int, trials: list, trial: "Trial", checkpoint: tune.Checkpoint, **info: Any
    ) -> None:
        self.checkpoints[trial.trial_id] = checkpoint

    def on_trial_complete(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
        finished = bool((trial.last_result or {}).get("finished"))
        self._finish(trial, RunStatus.FINISHED if finished else RunStatus.KILLED)

    def on_trial_error(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
        self._finish(trial, RunStatus.FAILED)

    def _start(self, trial: "Trial") -> None:
        if trial.trial_id in self.started:
            return
        args = {
            "trial_id": trial.trial_id,
            "run_name": str(trial),
            "params": trial_params(trial, self.static_params),
            "role": self.role,
            "parent_run_id": self.parent_run_id,
            "datasets": [dataclasses.asdict(dataset) for dataset in self.datasets],
        }
        self.outbox.append("start_child", args)
        self.started.add(trial.trial_id)

    def _finish(self, trial: "Trial", status: RunStatus) -> None:
        """The checkpoint's artifacts are copied into the outbox now: Tune may delete the checkpoint later."""
        self._start(trial)
        args = {"trial_id": trial.trial_id, "status": RunStatus.to_string(status)}
        checkpoint = self.checkpoints.get(trial.trial_id) or trial.checkpoint
        if checkpoint is None:
            self.outbox.append("finish_child", args)
            return
        with checkpoint.as_directory() as folder:
            files = [Path(folder) / name for name in TRIAL_ARTIFACTS if (Path(folder) / name).is_file()]
            self.outbox.append("finish_child", args, files)
