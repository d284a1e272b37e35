"""A resumed search drops the MLflow runs of trials its Tune snapshot never held (the driver was killed between
a trial's start and the snapshot), and only those."""

from __future__ import annotations

from mlflow import MlflowClient

from ptune_search.search.tracking.records import SearchTracker


def test_runs_of_trials_tune_does_not_know_are_deleted_unless_they_logged_something(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config_file = tmp_path / "config.yaml"
    config_file.write_text("seed: 0\n")
    tracker = SearchTracker(uri, "ghosts", tmp_path / "search", None)
    parent = tracker.start_parent("search", {}, config_file)
    runs = {trial: tracker.child_run(trial, trial, {}, "trial", parent) for trial in ("known", "ghost", "logged")}
    baseline = tracker.child_run("baseline", "baseline", {}, "baseline", parent)
    tracker.log_result("logged", 3, [["val_loss", 1.0, 0, 3]])

    resumed = SearchTracker(uri, "ghosts", tmp_path / "search", None)
    resumed.start_parent("search", {}, config_file)
    resumed.drop_ghost_runs("trial", {"known"})

    client = MlflowClient(uri)
    stages = {trial: client.get_run(run_id).info.lifecycle_stage for trial, run_id in runs.items()}
    assert stages == {"known": "active", "ghost": "deleted", "logged": "active"}
    assert client.get_run(baseline).info.lifecycle_stage == "active", "another role's runs are not touched"
    assert resumed.child_run_id("ghost") is None
