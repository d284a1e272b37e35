"""An MLflow store that stops answering loses nothing: records wait in the outbox and arrive, each step once.

The first tests drive the outbox, its sender and the tracker directly against real stores (sqlite, and a
real ``mlflow server`` killed and started again); the last runs the tiny search while its tracking server
is down for a minute.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ptune_search.config import load_config
from ptune_search.models.prompt_folder import TRIAL_ARTIFACTS
from ptune_search.search.lifecycle import OUTBOX_DIR, SearchRecords
from ptune_search.search.tracking.outbox import JOURNAL_FILE, REFUSED_FILE, TrackingOutbox
from ptune_search.search.tracking.records import BEST_TAG, ROLE_TAG, TRIAL_TAG, SearchTracker
from ptune_search.search.tracking.sender import OutboxSender, StoreUnreachable
from tests.reliability.mlflow_server import MlflowServer, free_port, mlflow_server  # noqa: F401 - a fixture
from tests.search.search_process import TINY_CONFIG, SearchProcess, assert_no_survivors, wait_for

OUTAGE_S = 60.0
PARENT_ARTIFACTS = {"trials.csv", "config.yaml", "optuna_optimization_history.html"}


def new_tracker(uri: str, folder: Path) -> SearchTracker:
    return SearchTracker(uri, "outbox", folder / "search", folder / "mlartifacts" if uri.startswith("sqlite") else None)


def start_search(tracker: SearchTracker, folder: Path) -> str:
    config = folder / "config.yaml"
    config.write_text("seed: 0\n")
    return tracker.start_parent("search", {"seed": 0}, config)


def result(trial_id: str, step: int, window: int = 3) -> tuple[str, dict[str, Any]]:
    """A log_result record as the Tune callback writes it: a loss per step, val_loss at the window's end."""
    now = int(time.time() * 1000)
    metrics = [["train_loss", 1.0 / s, now, s] for s in range(step - window + 1, step + 1)]
    metrics.append(["val_loss", 0.5 / step, now, step])
    return "log_result", {"trial_id": trial_id, "step": step, "metrics": metrics}


def start_child(trial_id: str, parent_run_id: str) -> tuple[str, dict[str, Any]]:
    args = {
        "trial_id": trial_id,
        "run_name": f"trial_{trial_id}",
        "params": {"lr": 0.01, "pre_seq_len": 4},
        "role": "trial",
        "parent_run_id": parent_run_id,
    }
    return "start_child", args


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


class AnswerLostAfterWrite:
    """An MlflowClient whose first ``lose`` metric batches reach the store but whose answers are lost."""

    def __init__(self, client: MlflowClient, lose: int):
        self._client, self.lose = client, lose

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def log_batch(self, run_id: str, metrics: list = (), **kwargs: Any) -> None:
        self._client.log_batch(run_id, metrics=metrics, **kwargs)
        if metrics and self.lose > 0:
            self.lose -= 1
            raise MlflowException("API request failed with exception ('Connection aborted.', RemoteDisconnected())")


def test_a_journal_left_by_a_dead_driver_is_sent_by_the_next_one(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_search(new_tracker(uri, tmp_path), tmp_path)
    prompt = tmp_path / "checkpoint" / "prompt.safetensors"
    prompt.parent.mkdir()
    prompt.write_bytes(b"prompt bytes")
    first = TrackingOutbox(tmp_path / "outbox")
    for operation, args in [start_child("t1", parent), result("t1", 3), result("t1", 6)]:
        first.append(operation, args)
    first.append("finish_child", {"trial_id": "t1", "status": "FINISHED"}, [prompt])
    prompt.unlink()  # Tune deletes old checkpoints: the outbox holds its own copy
    with open(tmp_path / "outbox" / JOURNAL_FILE, "a") as journal:
        journal.write('{"seq": 5, "operation": "log_res')  # a crash in the middle of an append

    second = TrackingOutbox(tmp_path / "outbox")
    assert second.waiting() == 4
    tracker = new_tracker(uri, tmp_path)
    with OutboxSender(second, tracker) as sender:
        assert sender.flush(timeout_s=120)

    client = MlflowClient(uri)
    run_id = tracker.child_run_id("t1")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params == {"lr": "0.01", "pre_seq_len": "4"}
    assert steps(client, run_id, "train_loss") == [1, 2, 3, 4, 5, 6]
    assert steps(client, run_id, "val_loss") == [3, 6]
    downloaded = Path(client.download_artifacts(run_id, "prompt.safetensors", str(tmp_path)))
    assert downloaded.read_bytes() == b"prompt bytes"
    assert (tmp_path / "outbox" / JOURNAL_FILE).read_text() == ""
    assert not list((tmp_path / "outbox" / "files").iterdir())
    assert TrackingOutbox(tmp_path / "outbox").waiting() == 0


def test_a_metric_batch_whose_answer_was_lost_is_logged_once(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = new_tracker(uri, tmp_path)
    parent = start_search(tracker, tmp_path)
    tracker.client = AnswerLostAfterWrite(tracker.client, lose=3)
    outbox = TrackingOutbox(tmp_path / "outbox")
    for operation, args in [start_child("t1", parent), result("t1", 3), result("t1", 6), result("t1", 9)]:
        outbox.append(operation, args)
    with OutboxSender(outbox, tracker, min_backoff_s=0.1, max_backoff_s=0.2) as sender:
        assert sender.flush(timeout_s=120)

    assert tracker.client.lose == 0, "every lost answer was exercised"
    client = MlflowClient(uri)
    run_id = tracker.child_run_id("t1")
    assert steps(client, run_id, "train_loss") == list(range(1, 10))
    assert steps(client, run_id, "val_loss") == [3, 6, 9]


def test_a_record_the_store_refuses_is_kept_aside_and_the_rest_is_sent(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = new_tracker(uri, tmp_path)
    parent = start_search(tracker, tmp_path)
    outbox = TrackingOutbox(tmp_path / "outbox")
    for operation, args in [result("never-started", 3), start_child("t2", parent), result("t2", 3)]:
        outbox.append(operation, args)
    with OutboxSender(outbox, tracker) as sender:
        assert sender.flush(timeout_s=120)

    (refused,) = [json.loads(line) for line in (tmp_path / "outbox" / REFUSED_FILE).read_text().splitlines()]
    assert refused["args"]["trial_id"] == "never-started" and "no run of trial never-started" in refused["reason"]
    assert steps(MlflowClient(uri), tracker.child_run_id("t2"), "val_loss") == [3]


@pytest.mark.slow
def test_records_wait_while_the_server_is_down_and_arrive_after_a_restart(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    tracker = new_tracker(mlflow_server.uri, tmp_path)
    parent = start_search(tracker, tmp_path)
    mlflow_server.kill()
    outbox = TrackingOutbox(tmp_path / "outbox")
    for operation, args in [start_child("t1", parent), result("t1", 3), result("t1", 6)]:
        outbox.append(operation, args)

    config = load_config(
        TINY_CONFIG,
        [f"output_dir={tmp_path}", f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.flush_timeout_s=5"],
        check_paths=False,
    )
    with OutboxSender(outbox, tracker) as sender, pytest.raises(StoreUnreachable) as unreachable:
        SearchRecords(config, tracker, outbox, sender).deliver()
    assert f"MLflow at {mlflow_server.uri} unreachable, 3 operations waiting; retrying" in capsys.readouterr().out
    assert f"3 records it has not taken are kept in the outbox {outbox.directory}" in str(unreachable.value)
    assert "ptune-search search CONFIG --resume" in str(unreachable.value)

    mlflow_server.start()
    restarted = TrackingOutbox(tmp_path / "outbox")
    with OutboxSender(restarted, new_tracker(mlflow_server.uri, tmp_path)) as sender:
        assert sender.flush(timeout_s=120)
    client = MlflowClient(mlflow_server.uri)
    run_id = new_tracker(mlflow_server.uri, tmp_path).child_run_id("t1")
    assert steps(client, run_id, "train_loss") == [1, 2, 3, 4, 5, 6]
    assert steps(client, run_id, "val_loss") == [3, 6]


def test_a_search_whose_store_does_not_answer_fails_before_anything_starts(tmp_path: Path):
    uri = f"http://127.0.0.1:{free_port()}"
    output = tmp_path / "search"
    search = SearchProcess(TINY_CONFIG, [f"output_dir={output}", f"mlflow.tracking_uri={uri}"], tmp_path / "driver.log")
    try:
        assert search.wait(timeout=300) == 1, search.log()[-3000:]
        assert f"MLflow at {uri} does not answer" in search.log()
        assert not (output / "ray").exists()
        assert_no_survivors(search)
    finally:
        search.kill_everything()


def tune_results(output: Path) -> dict[str, dict[int, dict]]:
    """Tune trial id -> step -> the result Tune recorded (its own result.json), for the search and the baseline."""
    results: dict[str, dict[int, dict]] = {}
    for result_file in (output / "ray").glob("*/*/result.json"):
        for line in result_file.read_text().splitlines():
            reported = json.loads(line)
            results.setdefault(reported["trial_id"], {})[reported["step"]] = reported
    return results


def reported_results(output: Path) -> int:
    return sum(len(by_step) for by_step in tune_results(output).values())


def trial_metrics_stored(client: MlflowClient) -> bool:
    experiment = client.get_experiment_by_name("tiny")
    if experiment is None:
        return False
    runs = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")
    return any("val_accuracy" in run.data.metrics for run in runs)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # its waits: 600 s, a minute of outage, 600 s
def test_a_search_goes_on_through_a_minute_of_mlflow_outage_and_records_everything(
    mlflow_server: MlflowServer, tmp_path: Path
):
    output = tmp_path / "search"
    overrides = [f"output_dir={output}", f"mlflow.tracking_uri={mlflow_server.uri}"]
    search = SearchProcess(TINY_CONFIG, overrides, tmp_path / "driver.log")
    client = MlflowClient(mlflow_server.uri)
    try:
        wait_for(search, lambda: trial_metrics_stored(client), timeout=600)
        mlflow_server.kill()
        reported_at_kill, outage_ends = reported_results(output), time.monotonic() + OUTAGE_S
        while time.monotonic() < outage_ends:
            time.sleep(1.0)  # the outage lasts a fixed minute, whatever the search does meanwhile
        reported_at_restart = reported_results(output)
        mlflow_server.start()
        assert search.wait(timeout=600) == 0, search.log()[-5000:]
        log = search.log()
        assert_no_survivors(search)
    finally:
        search.kill_everything()

    assert reported_at_restart > reported_at_kill, "the search did not train while MLflow was down"
    assert f"MLflow at {mlflow_server.uri} unreachable" in log
    tune = tune_results(output)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([experiment])
    children = {run.data.tags[TRIAL_TAG]: run for run in runs if run.data.tags[ROLE_TAG] in {"trial", "baseline"}}
    assert set(children) == set(tune) and len(children) == len([r for r in runs if TRIAL_TAG in r.data.tags])
    for trial_id, run in children.items():
        reported = tune[trial_id]
        last = max(reported)
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == sorted(reported), f"{trial_id}: evaluations lost or duplicated"
        assert {m.step: m.value for m in history} == {step: r["val_accuracy"] for step, r in reported.items()}
        assert steps(client, run.info.run_id, "train_loss") == list(range(1, last + 1)), trial_id
        assert run.info.status == ("FINISHED" if reported[last]["finished"] else "KILLED"), trial_id
        artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
        assert set(TRIAL_ARTIFACTS) <= artifacts, f"{trial_id}: {artifacts}"

    (parent,) = [run for run in runs if run.data.tags[ROLE_TAG] == "search"]
    assert parent.info.status == "FINISHED"
    assert {"best_val_accuracy", "baseline_val_accuracy"} <= set(parent.data.metrics)
    assert PARENT_ARTIFACTS <= {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    assert sum(run.data.tags.get(BEST_TAG) == "true" for run in children.values()) == 1
    assert TrackingOutbox(output / OUTBOX_DIR).waiting() == 0
