"""What a search run starts and stops around its trials: the libraries' settings, Ray and the swarm, and the
delivery of its MLflow records (an outbox that survives a store that is down).

Ray and a local swarm start at the same time; the trial actors end first, then the swarm they use, then Ray.
A run that fails or is interrupted still hands the store what it recorded, or keeps it for ``--resume``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import ray

from ptune_search.config import ExperimentConfig
from ptune_search.prompts.mlflow_model import register_search_prompt
from ptune_search.search.report import HELD_OUT_METRICS, SearchReport
from ptune_search.search.resumed_settings import CONFIG_FILE, flat_settings
from ptune_search.search.sampler import sampler_params
from ptune_search.search.tracking.outbox import TrackingOutbox
from ptune_search.search.tracking.records import MlflowTrialCallback, SearchTracker
from ptune_search.search.tracking.sender import OutboxSender, StoreUnreachable
from ptune_search.search.tracking.task_dataset import TaskDatasetInput

logger = logging.getLogger(__name__)

OUTBOX_DIR = "mlflow_outbox"  # in output_dir: MLflow records the store has not taken yet
ABORT_FLUSH_TIMEOUT_S = 30.0  # an interrupted search waits at most this long for the store before it exits


def configure_libraries() -> None:
    """Settings of Tune and MLflow that a search needs, unless the user set them."""
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops at once, resumable
    # Snapshot the experiment every second (not every 10 s): a killed driver then resumes with at most a
    # second of trial state lost; what it replays, the MLflow callback and the searcher ignore.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Tune's newer console output prints its boxes and TensorBoard advice at any verbosity; with the older one,
    # verbose=0 prints nothing, and the search's own progress view (SearchProgress) is the console.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # MLflow's own HTTP retries would hold a write for minutes; the outbox sender retries with its own backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars on the console, nobody to watch


def write_config(config: ExperimentConfig, resume: bool) -> Path:
    """The config the search runs with, in output_dir (a resumed search keeps the one it started with)."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    config_file = config.output_dir / CONFIG_FILE
    if not (resume and config_file.exists()):
        config_file.write_text(config.to_yaml())
    return config_file


@dataclasses.dataclass
class SearchRecords:
    """The search's MLflow side: the tracker that writes to the store and the outbox it writes through."""

    config: ExperimentConfig
    tracker: SearchTracker
    outbox: TrackingOutbox
    sender: OutboxSender

    @classmethod
    @contextlib.contextmanager
    def open(cls, config: ExperimentConfig) -> Iterator["SearchRecords"]:
        """Records an interrupted run of this search left behind go to the store first."""
        # A sqlite store keeps artifacts beside it; a tracking server (http) stores them itself (proxying).
        artifact_root = config.output_dir / "mlartifacts" if config.tracking_uri.startswith("sqlite:") else None
        tracker = SearchTracker(
            config.tracking_uri, config.mlflow.experiment_name, config.output_dir, artifact_root, register_search_prompt
        )
        outbox = TrackingOutbox.open(config.output_dir / OUTBOX_DIR)
        with OutboxSender(outbox, tracker) as sender:
            records = cls(config, tracker, outbox, sender)
            records.deliver()
            yield records

    def trial_callback(
        self, parent_run_id: str, datasets: list[TaskDatasetInput], role: str = "trial"
    ) -> MlflowTrialCallback:
        return MlflowTrialCallback(self.outbox, parent_run_id, static_params(self.config), datasets, role=role)

    @contextlib.contextmanager
    def aborted_on_failure(self) -> Iterator[None]:
        """A failing or interrupted run marks its parent run aborted and waits a little for the store."""
        try:
            yield
        except BaseException:
            self.outbox.append("abort", {})
            if not self.sender.flush(min(ABORT_FLUSH_TIMEOUT_S, self.config.mlflow.flush_timeout_s)):
                logger.warning(
                    "MLflow at %s did not take %d records; they are kept in %s for --resume",
                    self.config.tracking_uri,
                    self.outbox.waiting(),
                    self.outbox.directory,
                )
            raise

    def start_parent(self, config_file: Path, datasets: list[TaskDatasetInput]) -> str:
        """The search's parent run, with every setting (the sampler's effective ones too) as params."""
        params = {**flat_settings(self.config.to_dict()), **sampler_params(self.config)}
        return self.tracker.start_parent(self.config.output_dir.name, params, config_file, datasets)

    def finish(
        self, parent_run_id: str, best_trial_id: str, tested: list[dict[str, Any]], report: SearchReport
    ) -> None:
        """Register the best trial's prompt and close the parent run with the summary and the report's files;
        ``deliver`` waits for the store to take it (the sender starts at once, while Ray and the swarm stop)."""
        now = int(time.time() * 1000)
        trial_metrics = {
            row["trial_id"]: {key: [row[key], now] for key in HELD_OUT_METRICS if row.get(key) is not None}
            for row in tested
        }
        self.outbox.append(
            "register_model",
            {
                "parent_run_id": parent_run_id,
                "best_trial_id": best_trial_id,
                "registered_model_name": self.config.registered_model_name,
            },
        )
        finish = {
            "parent_run_id": parent_run_id,
            "best_trial_id": best_trial_id,
            "summary": {key: [value, now] for key, value in report.summary.items()},
            "trial_metrics": trial_metrics,
        }
        self.outbox.append("finish_parent", finish, report.files)

    def deliver(self) -> None:
        """Wait for the store to take the outbox; if it stays down, stop, keeping the outbox for ``--resume``."""
        timeout = self.config.mlflow.flush_timeout_s
        if not self.sender.flush(timeout):
            raise StoreUnreachable(
                f"MLflow at {self.config.tracking_uri} did not answer for {timeout:.0f} s; the "
                f"{self.outbox.waiting()} records it has not taken are kept in the outbox {self.outbox.directory}; "
                "`ptune-search search CONFIG --resume` sends them"
            )


def static_params(config: ExperimentConfig) -> dict[str, Any]:
    """The settings every trial shares, logged as each trial run's params."""
    budget = config.budget
    return {
        "model": config.model,
        "task": config.task.name,
        "max_length": config.task.max_length,
        "batch_size": budget.batch_size,
        "max_steps": budget.max_steps,
        "eval_every": budget.eval_every,
        "rung_validation_size": budget.rung_validation_size,
        "seed": config.seed,
    }


@contextlib.contextmanager
def ray_and_swarm(config: ExperimentConfig, model_path: str, address: Optional[str]) -> Iterator[list[str]]:
    """Ray and a local swarm start at the same time (each takes seconds, neither needs the other); a swarm
    of Ray actors starts once Ray is up. Yields the swarm's initial peers."""
    if config.swarm.mode == "ray":
        with _ray(address), _swarm(config, model_path) as initial_peers:
            yield initial_peers
        return
    with contextlib.ExitStack() as swarm_exit:  # closed last: after a failed Ray start, once the swarm is up
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swarm-start") as pool:
            starting = pool.submit(swarm_exit.enter_context, _swarm(config, model_path))
            with _ray(address):
                yield starting.result()


@contextlib.contextmanager
def _ray(address: Optional[str]) -> Iterator[None]:
    """A private local Ray unless ``address`` names a cluster to join (ray.init() alone may join a stranger's)."""
    # The trial actors' output stays in Ray's logs (session_dir/logs, or the dashboard of a cluster): the
    # console shows the search's progress (SearchProgress), and a failed trial's error is in its error.txt.
    if address:
        context = ray.init(address=address, log_to_driver=False)
    else:
        context = ray.init(address="local", include_dashboard=False, log_to_driver=False)
    print(f"Logs of the trial processes: {Path(context.address_info['session_dir']) / 'logs'}", flush=True)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _swarm(config: ExperimentConfig, model_path: str) -> Iterator[list[str]]:
    if config.swarm.mode == "external":
        yield list(config.swarm.initial_peers)
        return
    if config.swarm.mode == "ray":  # servers as Ray actors on the cluster's swarm_host nodes
        from ptune_search.search.ray_swarm import RaySwarm

        with RaySwarm(model_path, config.model, servers=config.swarm.servers, replicas=config.swarm.replicas) as swarm:
            yield swarm.initial_peers
        return
    from ptune_search.swarm.launcher import LocalSwarm

    log_dir = config.output_dir / "swarm_logs"
    with LocalSwarm(model_path, config.swarm.servers, config.swarm.replicas, log_dir=log_dir) as swarm:
        yield swarm.initial_peers
