"""The search's two Tune runs: the head-only sweeps, then the trials Optuna proposes and ASHA stops.

Both run ``PromptTuningTrial`` actors over the shared swarm, store their state under ``output_dir/ray`` and
go on from it with ``resume``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import optuna
from ray import tune

from ptune_search.config import ExperimentConfig
from ptune_search.search.disk_space import OutputDisk
from ptune_search.search.disk_watch import FreeSpaceWatch
from ptune_search.search.head_sweep import candidate_lrs
from ptune_search.search.ordered_asha import OrderedASHA
from ptune_search.search.progress import SearchProgress
from ptune_search.search.report import asha_rungs
from ptune_search.search.sampler import InOrderPrunedOptunaSearcher, SearchSpaceSampler, build_sampler
from ptune_search.search.tracking.records import MlflowTrialCallback
from ptune_search.search.trial import PromptTuningTrial, TrialSettings
from ptune_search.search.trial_actors import TrialActors

logger = logging.getLogger(__name__)

METRIC, MODE = "val_accuracy", "max"
SEARCH_NAME, BASELINE_NAME = "search", "baseline"


def optuna_storage(output_dir: Path) -> optuna.storages.RDBStorage:
    """Next to the MLflow store, so ``optuna-dashboard sqlite:///<output_dir>/optuna.db`` opens it."""
    return optuna.storages.RDBStorage(f"sqlite:///{output_dir / 'optuna.db'}")


def fit_trials(
    config: ExperimentConfig,
    settings: TrialSettings,
    callback: MlflowTrialCallback,
    progress: SearchProgress,
    resume: bool,
    watchers: Sequence[tune.Callback] = (),
) -> tune.ResultGrid:
    """The prompt-tuning trials: proposed in order by Optuna, stopped at ASHA's rungs; ``watchers`` are more
    Tune callbacks (they see results after the MLflow callback and the progress view)."""
    run_path = Path(config.output_dir / "ray") / SEARCH_NAME
    trainable = _trainable(config, settings)
    if resume and tune.Tuner.can_restore(str(run_path)):
        logger.info("resuming the search stored in %s", run_path)
        # The run config comes back with the run; its MLflow callback reattaches to this driver's open outbox.
        return _restored(run_path, trainable, callback).fit()
    budget, scheduler = config.budget, config.scheduler
    searcher = InOrderPrunedOptunaSearcher(
        SearchSpaceSampler.of(config),
        build_sampler(config),
        optuna_storage(config.output_dir),
        SEARCH_NAME,
        METRIC,
        MODE,
        concurrency=budget.max_concurrent_trials,
        num_samples=budget.num_samples,
    )
    rungs = asha_rungs(scheduler.grace_period, scheduler.reduction_factor, budget.max_steps)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=OrderedASHA(rungs, scheduler.reduction_factor, concurrency=budget.max_concurrent_trials),
            num_samples=budget.num_samples,
            max_concurrent_trials=budget.max_concurrent_trials,
            reuse_actors=True,  # a trial actor takes the next trial: no new process, no new swarm join
        ),
        run_config=_run_config(config, SEARCH_NAME, callback, progress, settings, watchers),
    )
    try:
        return tuner.fit()
    finally:
        searcher.tell_ended()


def fit_head_sweeps(
    config: ExperimentConfig,
    settings: TrialSettings,
    callback: MlflowTrialCallback,
    progress: SearchProgress,
    resume: bool,
) -> tune.ResultGrid:
    """Head only, no prompts, the same step budget, its learning rate chosen on validation among
    ``budget.baseline_lrs`` candidates over ``search_space.head_lr`` (see ``head_sweep``): on the bare text (the
    baseline) and, when the trials read a template, on their inputs (the head they start from). Run at once."""
    run_path = Path(config.output_dir / "ray") / BASELINE_NAME
    trainable = _trainable(config, settings)
    if resume and tune.Tuner.can_restore(str(run_path)):
        return _restored(run_path, trainable, callback).fit()
    templated = settings.bare_task is not None
    inputs = ([True] if config.baseline or not templated else []) + ([False] if templated else [])
    lr = config.search_space.head_lr
    tuner = tune.Tuner(
        trainable,
        param_space={
            "tuning_mode": None,
            "pre_seq_len": 0,
            "baseline_lrs": candidate_lrs(lr.low, lr.high, config.budget.baseline_lrs),
            "bare_text": tune.grid_search(inputs),
        },
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, num_samples=1, max_concurrent_trials=config.budget.max_concurrent_trials
        ),
        run_config=_run_config(config, BASELINE_NAME, callback, progress, settings),
    )
    return tuner.fit()


def _restored(run_path: Path, trainable: Any, callback: MlflowTrialCallback) -> tune.Tuner:
    """The stored Tune run at ``run_path``, to go on with the trials of its last snapshot; the MLflow runs of
    trials the snapshot lacks are dropped first.

    With trial actors reused, a trial starts within Tune's snapshot period (1 s) of being created, so a
    driver killed in between leaves trials (an MLflow run, an Optuna trial) that no snapshot holds."""
    callback.drop_ghost_runs({trial.trial_id for trial in tune.ExperimentAnalysis(str(run_path.resolve())).trials})
    return tune.Tuner.restore(str(run_path), trainable, resume_errored=True)


def _trainable(config: ExperimentConfig, settings: TrialSettings) -> Any:
    trainable = tune.with_parameters(PromptTuningTrial, settings=settings)
    return tune.with_resources(trainable, {"cpu": config.resources.cpu})


def _run_config(
    config: ExperimentConfig,
    name: str,
    callback: MlflowTrialCallback,
    progress: SearchProgress,
    settings: TrialSettings,
    watchers: Sequence[tune.Callback] = (),
) -> tune.RunConfig:
    disk = OutputDisk.for_search(config, settings.model_path)
    return tune.RunConfig(
        name=name,
        storage_path=str(config.output_dir / "ray"),
        # The watch last: the result that crossed the line is recorded, and everything sees the experiment end.
        callbacks=[callback, TrialActors.of_this_driver(), progress, *watchers, FreeSpaceWatch(disk)],
        checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, checkpoint_at_end=True),
        failure_config=tune.FailureConfig(max_failures=config.budget.max_failures),
        verbose=0,  # the search prints its own progress (SearchProgress); Tune's tables go to the log file
    )
