"""`ptune-search search experiments/tiny.yaml`: trials over a real local swarm, Ray, Optuna and MLflow."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from ptune_search.search.console import LOG_FILE
from ptune_search.search.tracking.records import BEST_TAG
from tests.search.search_process import TINY_CONFIG, SearchProcess, assert_no_survivors
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


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SearchProcess, Path]]:
    """One tiny search for this module's tests (each reads what it specifies from it)."""
    folder = tmp_path_factory.mktemp("tiny-search")
    # reduction factor 4: one rung, at step 3, where a trial below the top quarter of the ended trials is stopped
    overrides = [f"output_dir={folder / 'search'}", "scheduler.reduction_factor=4"]
    search = SearchProcess(TINY_CONFIG, overrides, folder / "driver.log")
    try:
        assert search.wait(timeout=900) == 0, search.log()[-5000:]
        yield search, folder / "search"
    finally:
        search.kill_everything()


def test_tiny_search_records_every_trial_truthfully(tiny_search):
    search, output = tiny_search

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


NUM_SAMPLES = 4
MAX_CONSOLE_LINES = 60 + NUM_SAMPLES  # 60 lines plus one a trial, the JSON line of the outcome apart
PROGRESS = re.compile(r"^\s*\d+:\d\d (trial \d+|head sweep on the (bare text|template))\b")


def test_the_console_shows_progress_and_the_outcome_and_nothing_else(tiny_search):
    """What a user sees: one progress view, the final table, the MLflow URL; the libraries' chatter goes to the
    log file."""
    search, output = tiny_search
    lines = search.log().splitlines()
    outcome = lines.pop()  # the last line: the outcome as JSON, for scripts
    assert outcome.startswith('{"best_trial": ')

    assert len(lines) <= MAX_CONSOLE_LINES, "\n".join(lines)
    assert not [line for line in lines if re.search(r"warn|traceback|error", line, re.IGNORECASE)], "\n".join(lines)
    evaluations = [line for line in lines if PROGRESS.match(line) and " step " in line]
    trials = {PROGRESS.match(line).group(1) for line in evaluations}
    assert {f"trial {n}" for n in range(1, NUM_SAMPLES + 1)} <= trials, "\n".join(lines)
    assert "head sweep on the bare text" in trials
    first_step = next(line for line in evaluations if line.split(" step ")[0].endswith("trial 1"))
    assert re.search(rf"step {EVAL_EVERY}: val accuracy 0\.\d{{3}} \(best 0\.\d{{3}}\)", first_step), first_step
    assert re.search(r"\d running, \d finished, \d stopped; \d+:\d\d", first_step), first_step
    assert any("left in this stage" in line for line in evaluations)
    ended = [line for line in lines if PROGRESS.match(line) and re.search(r" (finished|stopped by ASHA)", line)]
    assert len(ended) >= NUM_SAMPLES + 1  # every trial and the sweep

    assert any(line.startswith("Trials:") for line in lines)
    assert any(line.startswith("Best trial: ") for line in lines)
    assert any(line.startswith("MLflow runs: ") for line in lines)
    log_file = output / LOG_FILE
    assert f"logs of Ray and the libraries: {log_file}" in search.log()
    assert log_file.stat().st_size > 0
