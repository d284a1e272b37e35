"""The held-out figure: a finished trial's final prompt and head, evaluated once on the test split.

Selection (the best trial, ASHA, Optuna) only ever sees validation; the test split is read here, after the
search, for the chosen trial and the baseline, so their test accuracies are free of selection bias. The
evaluation runs as a Ray task next to the trials (it needs the swarm, not the driver's cores).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ptune_search.models.prompt_folder import HEAD_FILE, PROMPT_FILE
from ptune_search.search.trial import TrialSettings, build_classifier, ptune_config_of
from ptune_search.training.steps import evaluate


@dataclasses.dataclass(frozen=True)
class TestFigures:
    accuracy: float
    loss: float


def add_test_figures(
    settings: TrialSettings,
    rows: list[dict[str, Any]],
    checkpoints: dict[str, tuple[dict[str, Any], tune.Checkpoint]],
    cpus: float,
) -> None:
    """Each row's ``test_accuracy`` and ``test_loss``, from its trial's final checkpoint."""
    figures = evaluate_checkpoints_on_test(
        settings, {row["trial_id"]: checkpoints[row["trial_id"]] for row in rows}, cpus
    )
    for row in rows:
        row["test_accuracy"] = figures[row["trial_id"]].accuracy
        row["test_loss"] = figures[row["trial_id"]].loss


def evaluate_checkpoints_on_test(
    settings: TrialSettings, trials: dict[str, tuple[dict[str, Any], tune.Checkpoint]], cpus: float
) -> dict[str, TestFigures]:
    """``trials`` maps a trial id to its Tune config and final checkpoint; all are evaluated at once.

    The driver reads the (small) prompt and head tensors, so the task may run on any node of a cluster.
    """
    task = ray.remote(num_cpus=cpus)(_evaluate_on_test)
    pending = {}
    for trial_id, (config, checkpoint) in trials.items():
        with checkpoint.as_directory() as folder:
            tensors = {**load_file(Path(folder) / PROMPT_FILE), **load_file(Path(folder) / HEAD_FILE)}
        pending[trial_id] = task.remote(settings, config, tensors)
    return {trial_id: ray.get(ref) for trial_id, ref in pending.items()}


def _evaluate_on_test(settings: TrialSettings, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> TestFigures:
    torch.set_num_threads(1)
    test = settings.task_of(config).test
    assert test is not None  # the driver asks only when the task has a test split
    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    model = build_classifier(
        settings.model_path,
        settings.task.num_labels,
        tokenizer.pad_token_id,
        ptune_config_of(config),
        settings.swarm,
    )
    try:
        unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"the final checkpoint holds tensors the model lacks: {unexpected}")
        evaluation = evaluate(model, test, settings.eval_batch_size)
    finally:
        model.close()
    return TestFigures(accuracy=evaluation.accuracy, loss=evaluation.loss)
