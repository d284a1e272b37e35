"""Output folders whose names hold quotes: the tracker finds its own runs again, and only its own."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from ptune_search.search.tracking.records import SearchTracker


@pytest.mark.parametrize("name", ["it's", 'say "hi"', 'it\'s "both" 100%_\\'])
def test_a_search_folder_with_quotes_finds_its_parent_and_trial_runs_again(tmp_path, name):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config_file = tmp_path / "config.yaml"
    config_file.write_text("seed: 0\n")
    # A neighbour whose name differs only where a LIKE wildcard would stand must not be taken for it.
    neighbour = SearchTracker(uri, "quotes", tmp_path / name.replace("'", "x").replace('"', "y"), None)
    neighbour_parent = neighbour.start_parent("neighbour", {}, config_file)
    neighbour.child_run("t1", "neighbour trial", {}, "trial", neighbour_parent)

    first = SearchTracker(uri, "quotes", tmp_path / name, None)
    parent = first.start_parent(name, {"output_dir": str(tmp_path / name)}, config_file)
    trial = first.child_run("t1", "trial t1", {"lr": 0.1}, "trial", parent)
    assert parent != neighbour_parent

    resumed = SearchTracker(uri, "quotes", tmp_path / name, None)  # a resumed driver knows nothing yet
    assert resumed.start_parent(name, {}, config_file) == parent
    assert resumed.child_run_id("t1") == trial
    resumed.abort()
    client = MlflowClient(uri)
    assert client.get_run(parent).info.status == client.get_run(trial).info.status == "KILLED"
    assert client.get_run(neighbour_parent).info.status == "RUNNING"
