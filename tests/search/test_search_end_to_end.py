"""`ptune-search search experiments/tiny.yaml`: trials over a real local swarm, Ray, Optuna and MLflow."""

from __future__ import annotations

import pytest

from ptune_search.search.tracking.records import BEST_TAG
from tests.search.search_process import assert_no_survivors
from tests.search.store_views import metric_steps, mlflow_client, runs_by_role, study_states, trial_runs

pytestmark = pytest.mark.slow

MAX_STEPS, EVAL_EVERY = 12, 3
MLFLOW_STATUS_OF_OPTUNA_STATE = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def test_tiny_search_records_every_trial_truthfully(run_search, tmp_path):
    # reduction factor 4: a trial reaching the step-3 rung below the best so far is stopped there.
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
    assert "PRUNED" in states.values(), "ASHA stopped no trial; the rung cut-off is not exercised"
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
