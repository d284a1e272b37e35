"""The end-of-search model registration is an outbox record: one that can never succeed is set aside, not
retried forever (which would hold the search's end until its flush timeout)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from ptune_search.prompts.mlflow_model import register_search_prompt
from ptune_search.search.tracking.outbox import OutboxRecord
from ptune_search.search.tracking.records import SearchTracker
from ptune_search.search.tracking.sender import is_refusal


def test_a_best_trial_without_its_prompt_is_refused_for_good(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SearchTracker(uri, "registration", tmp_path / "search", tmp_path / "mlartifacts", register_search_prompt)
    config = tmp_path / "config.yaml"
    config.write_text("model: tiny-llama\n")
    parent = tracker.start_parent("search", {"seed": 0}, config)
    tracker.child_run("t1", "trial_t1", {"lr": 0.01}, "trial", parent)  # finished without its artifacts

    record = OutboxRecord(
        1, "register_model", {"parent_run_id": parent, "best_trial_id": "t1", "registered_model_name": "m"}
    )
    with pytest.raises(MlflowException, match="cannot register the best prompt of run .* as model 'm'") as refused:
        tracker.write(record)
    assert is_refusal(refused.value)
    assert not tracker.client.search_registered_models()
