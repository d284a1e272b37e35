"""The held-out tests a search runs beside its trials: one warm actor on a real local swarm (tiny model), a
real Ray and real Tune runs."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import ray
import torch
from ray import tune
from safetensors.torch import save_file
from transformers import AutoTokenizer

from ptune_search.data import TaskSpec, load_task
from ptune_search.models.prompt_folder import HEAD_FILE, PROMPT_FILE
from ptune_search.search.held_out import HeldOutTests, LeadingTrialTests
from ptune_search.search.trial import TrialSettings, build_classifier, ptune_config_of
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.training.steps import evaluate

pytestmark = pytest.mark.slow

CONFIGS = {
    "deep": {"tuning_mode": "deep_ptune", "pre_seq_len": 3},
    "shallow": {"tuning_mode": "ptune", "pre_seq_len": 5},
    "head_only": {"tuning_mode": None, "pre_seq_len": 0},
}


@pytest.fixture(scope="module")
def settings(tiny_model_path: Path) -> Iterator[TrialSettings]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    task = load_task(TaskSpec(), tokenizer, 32, train_size=24, validation_size=8, seed=0, test_size=20)
    with LocalSwarm(tiny_model_path, servers=2) as swarm:
        ray.init(address="local", include_dashboard=False, num_cpus=2)
        try:
            yield TrialSettings(
                str(tiny_model_path),
                task,
                max_steps=2,
                eval_every=1,
                batch_size=4,
                seed=0,
                eval_batch_size=8,
                swarm=ClientConfig(initial_peers=swarm.initial_peers),
            )
        finally:
            ray.shutdown()


def _trained_tensors(settings: TrialSettings, config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """A trial's final prompt and head, as a trial's checkpoint holds them (drawn at random: any will do)."""
    torch.manual_seed(seed)
    model = build_classifier(settings.model_path, settings.task.num_labels, 0, ptune_config_of(config), None)
    return {name: torch.randn_like(p) for name, p in model.named_parameters() if p.requires_grad}


def _checkpoint(tensors: dict[str, torch.Tensor], folder: Path) -> tune.Checkpoint:
    folder.mkdir(parents=True)
    save_file({k: v for k, v in tensors.items() if not k.startswith("score.")}, folder / PROMPT_FILE)
    save_file({k: v for k, v in tensors.items() if k.startswith("score.")}, folder / HEAD_FILE)
    return tune.Checkpoint.from_directory(str(folder))


def _local_figures(settings: TrialSettings, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple:
    model = build_classifier(settings.model_path, settings.task.num_labels, 0, ptune_config_of(config), None)
    model.load_state_dict(tensors, strict=False)
    assert settings.task.test is not None
    evaluation = evaluate(model, settings.task.test, settings.eval_batch_size)
    return evaluation.accuracy, evaluation.loss


def test_one_actor_tests_trials_of_every_tuning_mode_as_a_local_model_would(settings, tmp_path):
    """The tester rebuilds its one classifier per trial: each figure equals a fresh local model's, whatever
    the trial before it was, and a test dropped then started again is a whole test."""
    tensors = {name: _trained_tensors(settings, config, seed) for seed, (name, config) in enumerate(CONFIGS.items())}
    checkpoints = {name: (CONFIGS[name], _checkpoint(tensors[name], tmp_path / name)) for name in CONFIGS}
    rows = [{"trial_id": name} for name in CONFIGS]
    with HeldOutTests(settings) as tests:
        tests.start("shallow", *checkpoints["shallow"])  # started early, as for a sweep's row
        tests.start("deep", *checkpoints["deep"])
        tests.drop("deep")  # as a lead taken by another trial
        assert tests.pending == ["shallow"]
        tests.add_figures(rows, checkpoints)
        assert tests.started == ["shallow", "deep", "deep", "head_only"]
    for row in rows:
        accuracy, loss = _local_figures(settings, CONFIGS[row["trial_id"]], tensors[row["trial_id"]])
        assert row["test_accuracy"] == pytest.approx(accuracy)
        assert row["test_loss"] == pytest.approx(loss, rel=1e-4)


def _reporting_trial(config: dict[str, Any]) -> None:
    """Finishes (or not) with the validation figures its config names, and a checkpoint of real tensors."""
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = _checkpoint(config["tensors"], Path(scratch) / "checkpoint")
        result = {"finished": config["finished"], "val_accuracy": config["accuracy"], "val_loss": config["loss"]}
        tune.report(result, checkpoint=checkpoint)


def test_a_trial_is_tested_as_it_finishes_ahead_of_the_trials_finished_before_it(settings, tmp_path):
    """In finishing order: 0.5 leads, 0.4 does not, an early-stopped 0.9 is no lead, 0.7 leads, an equal 0.7
    with a higher loss does not, an equal 0.7 with a lower loss does; each lead drops the test of the one
    before it."""
    tensors = _trained_tensors(settings, CONFIGS["shallow"], 0)
    finishes = [(0.5, 1.0, True), (0.4, 0.9, True), (0.9, 0.1, False), (0.7, 0.8, True), (0.7, 0.9, True)]
    finishes.append((0.7, 0.7, True))
    space = [
        {**CONFIGS["shallow"], "accuracy": a, "loss": loss, "finished": done, "tensors": tensors}
        for a, loss, done in finishes
    ]
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    with HeldOutTests(settings) as tests:
        grid = tune.Tuner(
            lambda config: _reporting_trial(space[config["case"]]),
            param_space={"case": tune.grid_search(list(range(len(space))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),  # they finish in the order of the list
            run_config=tune.RunConfig(
                storage_path=str(tmp_path), callbacks=[LeadingTrialTests(tests, "val_accuracy")], verbose=0
            ),
        ).fit()
        by_case = {result.config["case"]: result.metrics["trial_id"] for result in grid}
        assert tests.started == [by_case[0], by_case[3], by_case[5]]
        assert tests.pending == [by_case[5]]
