"""One tiny search, read back: every evaluation reached Optuna, and the held-out test figures are honest."""

from __future__ import annotations

from collections import Counter

import optuna
import pandas as pd
import pytest

from ptune_search.data import Examples, TaskSpec, load_examples, split_task, stratified_splits
from ptune_search.prompts.export import export_prompt
from ptune_search.prompts.predict import PromptClassifier
from ptune_search.search.sampler import TUNE_TRIAL_ID_ATTR
from ptune_search.search.tracking.records import BEST_TAG
from tests.search.search_process import assert_no_survivors
from tests.search.store_views import metric_steps, runs_by_role, trial_runs

TRAIN, VALIDATION, TEST = 200, 50, 60  # tiny.yaml's sizes, and the test split asked for here
SEED = 2  # with one trial at a time, a seed whose rung results are not all tied, so ASHA prunes


def _ids(split: Examples, full: Examples) -> set[int]:
    """Positions in the full data, by object identity (the corpus has duplicate texts)."""
    position = {id(text): index for index, text in enumerate(full.texts)}
    return {position[id(text)] for text in split.texts}


def test_the_test_split_is_disjoint_stratified_and_seeded():
    bbc = load_examples(TaskSpec())
    splits = stratified_splits(bbc, 1000, 300, 400, seed=0)
    train, validation, test = (_ids(s, bbc) for s in (splits.train, splits.validation, splits.test))
    assert (len(train), len(validation), len(test)) == (1000, 300, 400)
    assert not (train & validation) and not (train & test) and not (validation & test)
    class_sizes = Counter(bbc.labels)
    for label, size in class_sizes.items():
        assert abs(Counter(splits.test.labels)[label] - 400 * size / len(bbc)) <= 1
    same_validation = stratified_splits(bbc, 500, 300, 0, seed=0).validation
    assert _ids(same_validation, bbc) == validation, "validation does not depend on the test size"
    assert _ids(stratified_splits(bbc, 500, 300, 400, seed=0).test, bbc) == test, "nor test on the train size"


@pytest.mark.slow
def test_a_search_reports_every_evaluation_to_optuna_and_honest_test_figures(run_search, tmp_path):
    # one trial at a time: the seeded sampler and the rung order are then fixed, and so is which trials ASHA prunes
    # (with two at a time, trials that happened to reach each rung in improving order were never pruned)
    overrides = [f"task.test_size={TEST}", f"seed={SEED}", "budget.max_concurrent_trials=1"]
    search = run_search([*overrides, "scheduler.reduction_factor=4"])
    assert search.wait(timeout=900) == 0, search.log()[-5000:]
    output = tmp_path / "search"

    # every evaluation of every trial is an intermediate value at its optimizer step, PRUNED trials included
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{output / 'optuna.db'}")
    runs = trial_runs(output)
    states = {trial.state.name for trial in study.trials}
    assert "PRUNED" in states and "COMPLETE" in states
    for trial in study.trials:
        run = runs[trial.user_attrs[TUNE_TRIAL_ID_ATTR]]
        assert sorted(trial.intermediate_values) == metric_steps(output, run, "val_accuracy")
    parent = runs_by_role(output, "search")[0]
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["sampler.n_startup_trials"] == "2"
    assert parent.data.params["sampler.constant_liar"] == "True"

    # the held-out figures: parent, best child, baseline and trials.csv agree
    best = next(run for run in runs.values() if run.data.tags.get(BEST_TAG) == "true")
    baseline = runs_by_role(output, "baseline")[0]
    assert parent.data.metrics["best_test_accuracy"] == best.data.metrics["test_accuracy"]
    assert parent.data.metrics["baseline_test_accuracy"] == baseline.data.metrics["test_accuracy"]
    table = pd.read_csv(output / "trials.csv").set_index("trial_id")
    assert table.loc[best.data.tags["ptune_search.trial_id"], "test_accuracy"] == pytest.approx(
        best.data.metrics["test_accuracy"]
    )

    # ... and equal a separate evaluation of the exported prompt on the test split
    exported = export_prompt(f"sqlite:///{output / 'mlflow.db'}", tmp_path / "best", run_id=best.info.run_id)
    assert exported.manifest.source["test_accuracy"] == best.data.metrics["test_accuracy"]
    assert exported.manifest.source["prompt_init"] == best.data.params["prompt_init"]
    test = split_task(TaskSpec(), TRAIN, VALIDATION, TEST, seed=SEED).test
    with PromptClassifier(exported.folder, local_blocks=True) as classifier:
        predicted = [prediction.label for prediction in classifier.classify(test.texts)]
    accuracy = sum(p == test.label_names[label] for p, label in zip(predicted, test.labels)) / len(test)
    assert accuracy == pytest.approx(best.data.metrics["test_accuracy"], abs=1e-6)
    assert_no_survivors(search)
