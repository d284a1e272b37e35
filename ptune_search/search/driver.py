"""The search: Ray Tune runs trial actors over one shared swarm, Optuna proposes, ASHA stops, MLflow records."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
from typing import Any, Optional

import optuna
from ray import tune
from transformers import AutoTokenizer

from ptune_search.config import ExperimentConfig
from ptune_search.data import TEXT_SLOT, TaskData, TaskSplits, tokenize_task
from ptune_search.models.label_words import label_word_tokens, label_words
from ptune_search.search.console import library_logs_to_file
from ptune_search.search.disk_space import full_disk_reported
from ptune_search.search.held_out import HeldOutTests, LeadingTrialTests
from ptune_search.search.lifecycle import SearchRecords, configure_libraries, ray_and_swarm, write_config
from ptune_search.search.preflight import CheckedSearch, check_search, task_spec
from ptune_search.search.progress import SearchProgress
from ptune_search.search.report import (
    SearchReport,
    asha_rungs,
    best_finished_trial,
    final_checkpoints,
    trial_curves,
    trial_rows,
    validation_share,
    write_search_report,
)
from ptune_search.search.sweep_outcome import SweepOutcome, sweep_outcome
from ptune_search.search.tracking.records import MlflowTrialCallback, how_to_open_runs
from ptune_search.search.tracking.task_dataset import task_dataset_inputs
from ptune_search.search.trial import TrialSettings
from ptune_search.search.trial_actors import TrialActors
from ptune_search.search.tune_runs import METRIC, SEARCH_NAME, fit_head_sweeps, fit_trials, optuna_storage
from ptune_search.swarm.client.client_config import ClientConfig


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
    # The task is tokenized while Ray and the swarm start: the trials need it only once those are up.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
        inputs = pool.submit(_trial_inputs, checked)
        with full_disk_reported(checked.disk):
            return _run_search(checked.config, checked.model_path, checked.splits, inputs, address, checked.resume)


def _trial_inputs(checked: CheckedSearch) -> TrialInputs:
    config = checked.config
    tokenizer = AutoTokenizer.from_pretrained(checked.model_path)
    template, max_length = config.search_space.template, config.task.max_length
    data = tokenize_task(checked.splits, tokenizer, max_length, template)
    bare = None if template == TEXT_SLOT else tokenize_task(checked.splits, tokenizer, max_length)
    words = None
    if "label_words" in config.search_space.heads:
        words = tuple(label_word_tokens(tokenizer, label_words(data.label_names, config.task.label_words)))
    return TrialInputs(data, bare, words)


@dataclasses.dataclass(frozen=True)
class TrialInputs:
    """What the driver prepares once for every trial: the task's splits tokenized (with the template, and
    without it for the baseline when there is one), and the label words' tokens (None unless a label-words head
    is searched)."""

    task: TaskData
    bare_task: Optional[TaskData]
    label_word_tokens: Optional[tuple[int, ...]]


def _run_search(
    config: ExperimentConfig,
    model_path: str,
    splits: TaskSplits,
    tokenized: concurrent.futures.Future[TrialInputs],
    address: Optional[str],
    resume: bool,
) -> SearchOutcome:
    configure_libraries()
    config_file = write_config(config, resume)
    progress = SearchProgress.start(config.budget.max_steps)
    datasets = task_dataset_inputs(task_spec(config), splits, config.seed)
    with (
        library_logs_to_file(config.output_dir) as log_file,
        SearchRecords.open(config) as records,
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="report") as pool,
    ):
        print(f"Searching {config.model} on {config.task.name}; logs of Ray and the libraries: {log_file}", flush=True)
        # Trial actors end first (quietly, see TrialActors), then the swarm they use, then Ray.
        with records.aborted_on_failure():
            with ray_and_swarm(config, model_path, address) as initial_peers, TrialActors.of_this_driver():
                inputs = tokenized.result()
                settings = _trial_settings(config, model_path, inputs, initial_peers)
                parent_run_id = records.start_parent(config_file, datasets)
                # The head sweeps first: the baseline, and the head every trial starts from.
                callback = records.trial_callback(parent_run_id, datasets, role="baseline")
                sweep_grid = fit_head_sweeps(config, settings, callback, progress, resume)
                sweeps = sweep_outcome(sweep_grid, METRIC, config.baseline)
                settings = dataclasses.replace(settings, start_head=sweeps.start_head, head_lr=sweeps.head_lr)
                callback = records.trial_callback(parent_run_id, datasets)
                has_test = inputs.task.test is not None
                grid, rows, best = _fit_trials_tested(config, settings, sweeps, callback, progress, resume, has_test)
                # The report (seconds of plots) and the records are written while the trial actors, the swarm and
                # Ray stop: neither needs them.
                tested = [row for row in (best, sweeps.baseline, sweeps.start_row) if row is not None]
                write_report = functools.partial(_write_report, config, grid, rows, best, sweeps)
                finished = pool.submit(lambda: records.finish(parent_run_id, best["trial_id"], tested, write_report()))
            finished.result()
        records.deliver()
        print(how_to_open_runs(config.tracking_uri, records.tracker.experiment_id))
    return SearchOutcome(best, sweeps.baseline, rows, parent_run_id, sweeps.start_row)


def _fit_trials_tested(
    config: ExperimentConfig,
    settings: TrialSettings,
    sweeps: SweepOutcome,
    callback: MlflowTrialCallback,
    progress: SearchProgress,
    resume: bool,
    test: bool,
) -> tuple[tune.ResultGrid, list[dict[str, Any]], dict[str, Any]]:
    """The trials, their rows and the best; with ``test``, the best's and the sweeps' rows get their held-out
    figures. The tests run beside the trials: the sweeps' from the start, a trial's once it may be the best."""
    swept = [row for row in (sweeps.baseline, sweeps.start_row) if row is not None]
    with HeldOutTests(settings) if test else contextlib.nullcontext() as tests:
        if tests is not None:
            for row in swept:
                tests.start(row["trial_id"], *sweeps.checkpoints[row["trial_id"]])
        grid = fit_trials(config, settings, callback, progress, resume, [LeadingTrialTests(tests, METRIC)])
        rows = trial_rows(grid, METRIC)
        best = best_finished_trial(rows, METRIC)
        if tests is not None:
            tests.add_figures([best, *swept], {**sweeps.checkpoints, **final_checkpoints(grid)})
    return grid, rows, best


def _write_report(
    config: ExperimentConfig,
    grid: tune.ResultGrid,
    rows: list[dict[str, Any]],
    best: dict[str, Any],
    sweeps: SweepOutcome,
) -> SearchReport:
    study = optuna.load_study(study_name=SEARCH_NAME, storage=optuna_storage(config.output_dir))
    scheduler = config.scheduler
    rungs = asha_rungs(scheduler.grace_period, scheduler.reduction_factor, config.budget.max_steps)
    shares = {"validation_share": validation_share(grid), "baseline_validation_share": sweeps.validation_share}
    curves = trial_curves(grid, rows, METRIC)
    return write_search_report(
        config.output_dir, rows, best, study, sweeps.baseline, METRIC, curves, rungs, shares, sweeps.start_row
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
