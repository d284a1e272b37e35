"""A search runs end to end on another family: a tiny Qwen3 checkpoint, served by a local swarm."""

from __future__ import annotations

import pytest

from tests.models.tiny_families import make_tiny_checkpoint
from tests.search.search_process import assert_no_survivors
from tests.search.store_views import metric_steps, runs_by_role, study_states, trial_runs

pytestmark = pytest.mark.slow


def test_a_search_on_a_tiny_qwen3_records_its_trials(run_search, tmp_path):
    model = make_tiny_checkpoint(tmp_path / "tiny-qwen3", "qwen3")
    search = run_search(
        [f"model={model}", "budget.num_samples=2", "budget.max_steps=6", "baseline=false", "task.train_size=64"]
    )
    assert search.wait(timeout=900) == 0, search.log()[-5000:]
    output = tmp_path / "search"

    parents = runs_by_role(output, "search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["model"] == str(model)
    children = trial_runs(output)
    assert len(children) == 2 and set(study_states(output)) == set(children)
    for run in children.values():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert metric_steps(output, run, "val_accuracy")[0] == 3
    assert_no_survivors(search)
