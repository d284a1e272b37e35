"""`ptune-search search experiments/tiny.yaml`: trials over a real local swarm, Ray, Optuna and MLflow."""

from __future__ import annotations

import numpy as np
import pytest

from ptune_search.search.tracking.records import BEST_TAG
from tests.search.search_process import assert_no_survivors
from tests.search.store_views import (
    metric_steps,
    mlflow_client,
    runs_by_role,
    study_states,
    study_trials,
    trial_runs,
)

pytestmark = pytest.mark.slow

MAX_STEPS, EVAL_EVERY = 12, 3
MLFLOW_STATUS_OF_OPTUNA_STATE = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def assert_asha_stopped_exactly_the_trials_below_earlier_ones(output, reduction_factor: int, concurrency: int):
    """Trial ``k`` is stopped at the step-3 rung iff its value there is below the top ``1 / reduction_factor``
    of trials ``0 .. k - concurrency``'s (OrderedASHA): the decisions follow from the values, whatever the
    interleaving, so this holds on a loaded machine as on an idle one (tests/search/test_ordered_asha.py
    shows the rule stopping trials)."""
    trials = sorted(study_trials(output), key=lambda trial: trial.number)
    at_rung = [trial.intermediate_values[EVAL_EVERY] for trial in trials]
    for k, trial in enumerate(trials):
        earlier = at_rung[: max(0, k - concurrency + 1)]
        below = bool(earlier) and at_rung[k] < np.nanpercentile(earlier, (1 - 1 / reduction_factor) * 100)
        assert (trial.state.name == "PRUNED") == below, (k, at_rung, trial.state.name)
        if below:
            assert max(trial.intermediate_values) == EVAL_EVERY  # stopped at the rung, not later


def test_tiny_search_records_every_trial_truthfully(run_search, tmp_path):
    # reduction factor 4: one rung, at step 3, where a trial below the top quarter of the ended trials is stopped
    search = run_search(["scheduler.reduction_factor=4"])
    assert search.wait(timeout=900) == 0, search.log()[-5000:]
    output = tmp_path / "search"

    parents = runs_by_role(output, "search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["mlflow.source.git.commit"]
    assert parent.data.params["budget.max_steps"] == str(MAX_STEPS)
    parent_artifacts = {a.path for a in mlflow_client(output).list_artifacts(parent.info.run_id)}
    assert {
        "trials.csv",
        "config.yaml",
        "optuna_optimization_history.html",
        "optuna_parallel_coordinate.html",
    } <= parent_artifacts

    children = trial_runs(output)
    assert len(children) == 4
    assert {run.data.params["tuning_mode"] for run in children.values()} == {"ptune", "deep_ptune"}
    states = study_states(output)
    assert set(states) == set(children)
    assert_asha_stopped_exactly_the_trials_below_earlier_ones(output, reduction_factor=4, concurrency=2)
    for trial_id, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name.endswith(trial_id)
        assert {"tuning_mode", "pre_seq_len", "lr", "batch_size", "max_steps"} <= set(run.data.params)
        assert run.info.status == MLFLOW_STATUS_OF_OPTUNA_STATE[states[trial_id]]
        last_step = MAX_STEPS if states[trial_id] == "COMPLETE" else max(metric_steps(output, run, "val_accuracy"))
        assert metric_steps(output, run, "train_loss") == list(range(1, last_step + 1))
        assert metric_steps(output, run, "val_accuracy") == list(range(EVAL_EVERY, last_step + 1, EVAL_EVERY))
        artifacts = {a.path for a in mlflow_client(output).list_artifacts(run.info.run_id)}
        assert {"prompt.safetensors", "head.safetensors", "ptune_config.json"} <= artifacts

    best = [run for run in children.values() if run.data.tags.get(BEST_TAG) == "true"]
    assert len(best) == 1 and states[best[0].data.tags["ptune_search.trial_id"]] == "COMPLETE"
    baseline = runs_by_role(output, "baseline")
    assert len(baseline) == 1 and baseline[0].info.status == "FINISHED"
    assert baseline[0].data.params["tuning_mode"] == "None"
    assert_no_survivors(search)
