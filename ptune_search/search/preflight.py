"""What a search checks before it starts anything: the task's data, the model, an external swarm, the disk.

This module imports neither Ray, MLflow nor transformers: their imports run subprocesses (``ldconfig -p``,
``uname -p``), and a search that cannot start should start nothing, not even those.
"""

from __future__ import annotations

import dataclasses

from ptune_search.config import ExperimentConfig
from ptune_search.data import TaskDataError, TaskSpec, TaskSplits, split_task
from ptune_search.models.label_words import label_words
from ptune_search.pretrained import resolve_model
from ptune_search.search.disk_space import OutputDisk
from ptune_search.search.resumed_settings import check_resume_settings


@dataclasses.dataclass(frozen=True)
class CheckedSearch:
    """A search config whose inputs were found usable, with what checking them produced."""

    config: ExperimentConfig
    resume: bool
    splits: TaskSplits
    model_path: str
    disk: OutputDisk


def check_search(config: ExperimentConfig, resume: bool) -> CheckedSearch:
    """Raise ``TaskDataError``, ``FileNotFoundError``, ``OutputDiskFull`` or a swarm error for a search that
    cannot run, before any process starts."""
    if resume:
        check_resume_settings(config)
    task = config.task
    splits = split_task(task_spec(config), task.train_size, task.validation_size, task.test_size, config.seed)
    try:
        label_words(splits.train.label_names, task.label_words)
    except ValueError as error:
        raise TaskDataError(f"task.label_words: {error}") from None
    model_path = str(resolve_model(config.model))
    if config.swarm.mode == "external":
        check_swarm_reachable(config.swarm.initial_peers)
    disk = OutputDisk.for_search(config, model_path)
    disk.check_room_to_start()
    return CheckedSearch(config, resume, splits, model_path, disk)


def task_spec(config: ExperimentConfig) -> TaskSpec:
    """Where the search's task comes from and how its file is read."""
    task = config.task
    return TaskSpec(task.name, task.text_column, task.label_column, task.skip_invalid_rows)


def check_swarm_reachable(initial_peers: list[str]) -> None:
    """Join the external swarm once as a client, so an unreachable one fails before Ray starts."""
    from ptune_search.swarm.client.connection import SwarmConnection  # hivemind: only for an external swarm

    SwarmConnection(initial_peers, startup_timeout=30).close()
