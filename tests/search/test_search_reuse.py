"""A search reuses trial actors (Tune's ``reuse_actors``): each trial is still recorded as its own, and the
actor of a failed trial is never given another one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

from ptune_search.search.sampler import TUNE_TRIAL_ID_ATTR
from tests.search.search_process import assert_no_survivors
from tests.search.store_views import metric_steps, study_states, trial_runs

pytestmark = pytest.mark.slow

NUM_SAMPLES, MAX_STEPS, EVAL_EVERY = 6, 6, 3
MLFLOW_STATUS_OF_OPTUNA_STATE = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
# Learning rates up to 1e13 make some trials' prompts diverge (a real failure: the swarm refuses non-finite
# values); no retries, so a failed trial stays failed.
OVERRIDES = [
    f"budget.num_samples={NUM_SAMPLES}",
    f"budget.max_steps={MAX_STEPS}",
    f"budget.eval_every={EVAL_EVERY}",
    "budget.max_failures=0",
    "search_space.lr.low=1e-3",
    "search_space.lr.high=1e13",
    "baseline=false",
]


def tune_trials(output: Path) -> dict[str, dict]:
    """Tune trial id -> the pids its results came from, when it last reported, and (if it failed) the pid
    named in its error and the error file's time."""
    trials = {}
    for folder in (output / "ray" / "search").iterdir():
        params, result_file = folder / "params.json", folder / "result.json"
        if not params.exists():
            continue
        results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        error = folder / "error.txt"
        failed_on = re.search(r"pid=(\d+)", error.read_text()) if error.exists() else None
        trial_id = results[0]["trial_id"] if results else folder.name.split("_")[1]
        trials[trial_id] = {
            "pids": {result["pid"] for result in results},
            "first_report": min((result["reported_at"] for result in results), default=None),
            "last_report": max((result["reported_at"] for result in results), default=None),
            "failed_pid": int(failed_on.group(1)) if failed_on else None,
            "failed_at": error.stat().st_mtime if error.exists() else None,
        }
    return trials


def test_trials_on_reused_actors_are_recorded_as_their_own_and_a_failed_actor_is_not_reused(run_search, tmp_path):
    search = run_search(OVERRIDES)
    assert search.wait(timeout=900) == 0, search.log()[-5000:]
    output = tmp_path / "search"

    trials = tune_trials(output)
    children = trial_runs(output)
    states = study_states(output)
    assert set(trials) == set(children) == set(states) and len(trials) == NUM_SAMPLES
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{output / 'optuna.db'}")
    intermediate = {t.user_attrs[TUNE_TRIAL_ID_ATTR]: sorted(t.intermediate_values) for t in study.trials}
    for trial_id, run in children.items():
        assert run.info.status == MLFLOW_STATUS_OF_OPTUNA_STATE[states[trial_id]], trial_id
        val_steps = metric_steps(output, run, "val_accuracy")
        assert intermediate[trial_id] == val_steps, trial_id
        last_step = MAX_STEPS if states[trial_id] == "COMPLETE" else max(val_steps, default=0)
        assert val_steps == list(range(EVAL_EVERY, last_step + 1, EVAL_EVERY)), trial_id
        assert metric_steps(output, run, "train_loss") == list(range(1, last_step + 1)), trial_id

    actors = [trial["pids"] | {trial["failed_pid"]} - {None} for trial in trials.values()]
    assert len(set().union(*actors)) < len(trials), f"no actor was reused: {trials}"
    assert all(len(pids) == 1 for pids in actors), "a trial moved between actors"
    first_report = {trial_id: trial["first_report"] for trial_id, trial in trials.items()}
    reused = [
        trial_id
        for trial_id, trial in trials.items()
        if trial["pids"]
        and any(
            other["pids"] == trial["pids"] and first_report[o] < first_report[trial_id]
            for o, other in trials.items()
            if first_report[o] is not None
        )
    ]
    assert reused, "no trial that reported results ran on an actor of an earlier trial"
    failed = {trial_id: trial for trial_id, trial in trials.items() if trial["failed_pid"] is not None}
    assert failed and {states[trial_id] for trial_id in failed} == {"FAIL"}, states
    assert "COMPLETE" in states.values(), states
    for trial_id, trial in failed.items():
        for other_id, other in trials.items():
            if other_id != trial_id and trial["failed_pid"] in other["pids"]:
                assert other["last_report"] < trial["failed_at"], f"{other_id} ran on the actor {trial_id} failed on"
    assert_no_survivors(search)
