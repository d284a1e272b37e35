"""The search: Ray Tune runs trial actors over one shared swarm, Optuna proposes, ASHA stops, MLflow records."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
import ray
import torch
from ray import tune
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ptune_search.config import ExperimentConfig
from ptune_search.data import TEXT_SLOT, TaskData, tokenize_task
from ptune_search.models.label_words import label_word_tokens, label_words
from ptune_search.models.prompt_folder import HEAD_FILE
from ptune_search.prompts.mlflow_model import register_search_prompt
from ptune_search.search.disk_space import OutputDisk, full_disk_reported
from ptune_search.search.disk_watch import FreeSpaceWatch
from ptune_search.search.head_sweep import FINE_TUNE_LR_SCALE, candidate_lrs
from ptune_search.search.held_out import evaluate_checkpoints_on_test
from ptune_search.search.ordered_asha import OrderedASHA
from ptune_search.search.ordered_optuna import OrderedOptunaSearch
from ptune_search.search.preflight import CheckedSearch, check_search, task_spec
from ptune_search.search.report import (
    HELD_OUT_METRICS,
    asha_rungs,
    best_finished_trial,
    final_checkpoints,
    head_sweep_rows,
    trial_curves,
    trial_rows,
    validation_share,
    write_search_report,
)
from ptune_search.search.resumed_settings import CONFIG_FILE, flat_settings
from ptune_search.search.sampler import SearchSpaceSampler, build_sampler, sampler_params
from ptune_search.search.tracking.outbox import TrackingOutbox
from ptune_search.search.tracking.records import MlflowTrialCallback, SearchTracker, how_to_open_runs
from ptune_search.search.tracking.sender import OutboxSender, StoreUnreachable
from ptune_search.search.tracking.task_dataset import TaskDatasetInput, task_dataset_inputs
from ptune_search.search.trial import PromptTuningTrial, TrialSettings
from ptune_search.search.trial_actors import TrialActors
from ptune_search.swarm.client.client_config import ClientConfig

logger = logging.getLogger(__name__)

METRIC, MODE = "val_accuracy", "max"
SEARCH_NAME, BASELINE_NAME = "search", "baseline"
OUTBOX_DIR = "mlflow_outbox"  # in output_dir: MLflow records the store has not taken yet
ABORT_FLUSH_TIMEOUT_S = 30.0  # an interrupted search waits at most this long for the store before it exits


@dataclasses.dataclass(frozen=True)
class SearchOutcome:
    best_trial: dict[str, Any]  # its row, with test_accuracy when the task has a test split
    baseline: Optional[dict[str, Any]]  # the head-only baseline's row (its chosen lr in baseline_lr)
    trials: list[dict[str, Any]]
    parent_run_id: str
    start_head: Optional[dict[str, Any]] = None  # the head sweep on the trials' template, if not the baseline

    @property
    def baseline_accuracy(self) -> Optional[float]:
        return None if self.baseline is None else self.baseline[METRIC]


def run_search(config: ExperimentConfig, address: Optional[str] = None, resume: bool = False) -> SearchOutcome:
    """Run (or with ``resume``, continue) the search that ``config`` describes; returns the best trial.

    Everything that can fail fast (the task's data, the model, an external swarm) is checked before a
    process starts. Ctrl-C stops the search at once (Tune's own SIGINT handler is off) and leaves it
    resumable with ``resume=True``.
    """
    return run_checked_search(check_search(config, resume), address)


def run_checked_search(checked: CheckedSearch, address: Optional[str] = None) -> SearchOutcome:
    """Run a search whose inputs ``check_search`` has already checked (the CLI checks before this import)."""
    config = checked.config
    tokenizer = AutoTokenizer.from_pretrained(checked.model_path)
    template, max_length = config.search_space.template, config.task.max_length
    data = tokenize_task(checked.splits, tokenizer, max_length, template)
    bare = None if template == TEXT_SLOT else tokenize_task(checked.splits, tokenizer, max_length)
    words = None
    if "label_words" in config.search_space.heads:
        words = tuple(label_word_tokens(tokenizer, label_words(data.label_names, config.task.label_words)))
    with full_disk_reported(checked.disk):
        return _run_search(config, checked.model_path, TrialInputs(data, bare, words), address, checked.resume)


@dataclasses.dataclass(frozen=True)
class TrialInputs:
    """What the driver prepares once for every trial: the tokenized task (with the template, and without it for
    the baseline when there is one) and the label words' tokens (None unless a label-words head is searched)."""

    task: TaskData
    bare_task: Optional[TaskData]
    label_word_tokens: Optional[tuple[int, ...]]


def _run_search(
    config: ExperimentConfig, model_path: str, inputs: TrialInputs, address: Optional[str], resume: bool
) -> SearchOutcome:
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # Snapshot the experiment every second (not every 10 s): a killed driver then resumes with at most a
    # second of trial state lost; what it replays, the MLflow callback and the searcher ignore.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    output_dir = config.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    config_file = output_dir / CONFIG_FILE
    if not (resume and config_file.exists()):
        config_file.write_text(config.to_yaml())
    # A sqlite store keeps artifacts beside it; a tracking server (http) stores them itself (artifact proxying).
    artifact_root = output_dir / "mlartifacts" if config.tracking_uri.startswith("sqlite:") else None
    # MLflow's own HTTP retries would hold a write for minutes; the outbox sender retries with its own backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    tracker = SearchTracker(
        config.tracking_uri, config.mlflow.experiment_name, output_dir, artifact_root, register_search_prompt
    )
    outbox = TrackingOutbox.open(output_dir / OUTBOX_DIR)
    with OutboxSender(outbox, tracker) as sender:
        deliver_outbox(sender, config)  # records an interrupted run of this search left behind go first
        try:
            # Trial actors end first (quietly, see TrialActors), then the swarm they use, then Ray.
            with _ray_and_swarm(config, model_path, address) as initial_peers, TrialActors.of_this_driver():
                settings = _trial_settings(config, model_path, inputs, initial_peers)
                datasets = _task_datasets(config)
                params = {**flat_settings(config.to_dict()), **sampler_params(config)}
                parent_run_id = tracker.start_parent(output_dir.name, params, config_file, datasets)
                # The head sweeps first: the baseline, and the head every trial starts from (one sweep when the
                # trials read the bare text too).
                callback = MlflowTrialCallback(outbox, parent_run_id, _static_params(config), datasets, role="baseline")
                sweep_grid = _run_head_sweeps(config, settings, callback, resume)
                sweeps = head_sweep_rows(sweep_grid, METRIC)
                finals = final_checkpoints(sweep_grid)
                baseline = sweeps[True] if config.baseline else None
                start = sweeps[False] if False in sweeps else sweeps[True]
                start_head = _head_of(finals[start["trial_id"]][1])
                head_lr = start["lr"] * FINE_TUNE_LR_SCALE
                settings = dataclasses.replace(settings, start_head=start_head, head_lr=head_lr)
                baseline_share = validation_share(sweep_grid)
                callback = MlflowTrialCallback(outbox, parent_run_id, _static_params(config), datasets)
                grid = _fit(config, settings, callback, resume)
                rows = trial_rows(grid, METRIC)
                curves = trial_curves(grid, rows, METRIC)
                best = best_finished_trial(rows, METRIC)
                finals.update(final_checkpoints(grid))
                start_row = start if start is not baseline else None  # one sweep serves both without a template
                tested = [row for row in (best, baseline, start_row) if row is not None]
                if inputs.task.test is not None:
                    figures = evaluate_checkpoints_on_test(
                        settings, {row["trial_id"]: finals[row["trial_id"]] for row in tested}, config.resources.cpu
                    )
                    for row in tested:
                        row["test_accuracy"] = figures[row["trial_id"]].accuracy
                        row["test_loss"] = figures[row["trial_id"]].loss
        except BaseException:
            outbox.append("abort", {})
            if not sender.flush(min(ABORT_FLUSH_TIMEOUT_S, config.mlflow.flush_timeout_s)):
                logger.warning(
                    "MLflow at %s did not take %d records; they are kept in %s for --resume",
                    config.tracking_uri,
                    outbox.waiting(),
                    outbox.directory,
                )
            raise
        study = optuna.load_study(study_name=SEARCH_NAME, storage=_optuna_storage(output_dir))
        scheduler = config.scheduler
        rungs = asha_rungs(scheduler.grace_period, scheduler.reduction_factor, config.budget.max_steps)
        shares = {"validation_share": validation_share(grid), "baseline_validation_share": baseline_share}
        report = write_search_report(output_dir, rows, best, study, baseline, METRIC, curves, rungs, shares, start_row)
        now = int(time.time() * 1000)
        summary = {key: [value, now] for key, value in report.summary.items()}
        trial_metrics = {
            row["trial_id"]: {key: [row[key], now] for key in HELD_OUT_METRICS if row.get(key) is not None}
            for row in tested
        }
        finish = {
            "parent_run_id": parent_run_id,
            "best_trial_id": best["trial_id"],
            "summary": summary,
            "trial_metrics": trial_metrics,
        }
        register = {
            "parent_run_id": parent_run_id,
            "best_trial_id": best["trial_id"],
            "registered_model_name": config.registered_model_name,
        }
        outbox.append("register_model", register)
        outbox.append("finish_parent", finish, report.files)
        deliver_outbox(sender, config)
        print(how_to_open_runs(config.tracking_uri, tracker.experiment_id))
    return SearchOutcome(best, baseline, rows, parent_run_id, start_row)


def deliver_outbox(sender: OutboxSender, config: ExperimentConfig) -> None:
    """Wait for the store to take the outbox; if it stays down, stop, keeping the outbox for ``--resume``."""
    if not sender.flush(config.mlflow.flush_timeout_s):
        raise StoreUnreachable(
            f"MLflow at {config.tracking_uri} did not answer for {config.mlflow.flush_timeout_s:.0f} s; the "
            f"{sender.outbox.waiting()} records it has not taken are kept in the outbox {sender.outbox.directory}; "
            "`ptune-search search CONFIG --resume` sends them"
        )


def _trial_settings(
    config: ExperimentConfig, model_path: str, inputs: TrialInputs, initial_peers: list[str]
) -> TrialSettings:
    swarm = config.swarm
    return TrialSettings(
        model_path=model_path,
        task=inputs.task,
        bare_task=inputs.bare_task,
        label_word_tokens=inputs.label_word_tokens,
        max_steps=config.budget.max_steps,
        eval_every=config.budget.eval_every,
        batch_size=config.budget.batch_size,
        eval_batch_size=config.budget.eval_batch_size,
        rung_validation_size=config.budget.rung_validation_size,
        seed=config.seed,
        swarm=ClientConfig(
            initial_peers=initial_peers,
            request_timeout=swarm.request_timeout,
            block_wait_timeout=swarm.block_wait_timeout,
            trusted_servers=swarm.trusted_servers,
        ),
    )


def _task_datasets(config: ExperimentConfig) -> list[TaskDatasetInput]:
    task = config.task
    return task_dataset_inputs(task_spec(config), task.train_size, task.validation_size, config.seed, task.test_size)


def _optuna_storage(output_dir: Path) -> optuna.storages.RDBStorage:
    """Next to the MLflow store, so ``optuna-dashboard sqlite:///<output_dir>/optuna.db`` opens it."""
    return optuna.storages.RDBStorage(f"sqlite:///{output_dir / 'optuna.db'}")


def _fit(
    config: ExperimentConfig, settings: TrialSettings, callback: MlflowTrialCallback, resume: bool
) -> tune.ResultGrid:
    storage_path = str(config.output_dir / "ray")
    trainable = _trainable(config, settings)
    run_path = Path(storage_path) / SEARCH_NAME
    if resume and tune.Tuner.can_restore(str(run_path)):
        logger.info("resuming the search stored in %s", run_path)
        tuner = _restored(run_path, trainable, callback)
        # The run config comes back with the run; its MLflow callback reattaches to this driver's open outbox.
        return tuner.fit()
    budget, scheduler = config.budget, config.scheduler
    searcher = OrderedOptunaSearch(
        space=SearchSpaceSampler.of(config),
        metric=METRIC,
        mode=MODE,
        sampler=build_sampler(config),
        storage=_optuna_storage(config.output_dir),
        study_name=SEARCH_NAME,
        concurrency=budget.max_concurrent_trials,
        num_samples=budget.num_samples,
    )
    rungs = asha_rungs(scheduler.grace_period, scheduler.reduction_factor, budget.max_steps)
    asha = OrderedASHA(rungs, scheduler.reduction_factor, concurrency=budget.max_concurrent_trials)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=asha,
            num_samples=config.budget.num_samples,
            max_concurrent_trials=config.budget.max_concurrent_trials,
            reuse_actors=True,  # a trial actor takes the next trial: no new process, no new swarm join
        ),
        run_config=_run_config(
            SEARCH_NAME, storage_path, callback, config.budget.max_failures, _disk(config, settings)
        ),
    )
    try:
        return tuner.fit()
    finally:
        searcher.tell_ended()


def _run_head_sweeps(
    config: ExperimentConfig, settings: TrialSettings, callback: MlflowTrialCallback, resume: bool
) -> tune.ResultGrid:
    """Head only, no prompts, the same step budget, its learning rate chosen on validation among
    ``budget.baseline_lrs`` candidates over ``search_space.head_lr`` (see ``head_sweep``): on the bare text (the
    baseline) and, when the trials read a template, on their inputs (the head they start from). Run at once."""
    storage_path = str(config.output_dir / "ray")
    run_path = Path(storage_path) / BASELINE_NAME
    trainable = _trainable(config, settings)
    if resume and tune.Tuner.can_restore(str(run_path)):
        tuner = _restored(run_path, trainable, callback)
    else:
        templated = settings.bare_task is not None
        inputs = ([True] if config.baseline or not templated else []) + ([False] if templated else [])
        tuner = tune.Tuner(
            trainable,
            param_space={
                "tuning_mode": None,
                "pre_seq_len": 0,
                "baseline_lrs": _baseline_lrs(config),
                "bare_text": tune.grid_search(inputs),
            },
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, num_samples=1, max_concurrent_trials=config.budget.max_concurrent_trials
            ),
            run_config=_run_config(
                BASELINE_NAME, storage_path, callback, config.budget.max_failures, _disk(config, settings)
            ),
        )
    return tuner.fit()


def _restored(run_path: Path, trainable: Any, callback: MlflowTrialCallback) -> tune.Tuner:
    """The stored Tune run at ``run_path``, to go on with the trials of its last snapshot; the MLflow runs of
    trials the snapshot lacks are dropped first.

    With trial actors reused, a trial starts within Tune's snapshot period (1 s) of being created, so a
    driver killed in between leaves trials (an MLflow run, an Optuna trial) that no snapshot holds."""
    callback.drop_ghost_runs({trial.trial_id for trial in tune.ExperimentAnalysis(str(run_path.resolve())).trials})
    return tune.Tuner.restore(str(run_path), trainable, resume_errored=True)


def _baseline_lrs(config: ExperimentConfig) -> list[float]:
    lr = config.search_space.head_lr
    return candidate_lrs(lr.low, lr.high, config.budget.baseline_lrs)


def _head_of(checkpoint: tune.Checkpoint) -> torch.Tensor:
    """The head weight a sweep's (best) checkpoint holds."""
    with checkpoint.as_directory() as folder:
        return load_file(Path(folder) / HEAD_FILE)["score.weight"]


def _disk(config: ExperimentConfig, settings: TrialSettings) -> OutputDisk:
    return OutputDisk.for_search(config, settings.model_path)


def _trainable(config: ExperimentConfig, settings: TrialSettings) -> Any:
    trainable = tune.with_parameters(PromptTuningTrial, settings=settings)
    return tune.with_resources(trainable, {"cpu": config.resources.cpu})


def _run_config(
    name: str, storage_path: str, callback: MlflowTrialCallback, max_failures: int, disk: OutputDisk
) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        # The watch after MLflow: the last result is recorded.
        callbacks=[callback, FreeSpaceWatch(disk), TrialActors.of_this_driver()],
        checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, checkpoint_at_end=True),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        progress_reporter=tune.CLIReporter(
            parameter_columns=["tuning_mode", "pre_seq_len", "lr", "head"],
            metric_columns=["step", "train_loss", "eval_accuracy", "val_accuracy", "best_step", "tokens_per_s"],
            max_report_frequency=30,
        ),
    )


def _static_params(config: ExperimentConfig) -> dict[str, Any]:
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
def _ray(address: Optional[str]) -> Iterator[None]:
    """A private local Ray unless ``address`` names a cluster to join (ray.init() alone may join a stranger's)."""
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _ray_and_swarm(config: ExperimentConfig, model_path: str, address: Optional[str]) -> Iterator[list[str]]:
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

    with LocalSwarm(model_path, servers=config.swarm.servers, replicas=config.swarm.replicas) as swarm:
        yield swarm.initial_peers
