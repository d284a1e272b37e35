"""A search survives its driver being killed and Ctrl-C.

Trials restored from their checkpoints after a failure are checked in tests/reliability/test_swarm_faults_search.py.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.search.search_process import assert_no_survivors, wait_for
from tests.search.store_views import metric_steps, runs_by_role, study_states, trial_runs

pytestmark = pytest.mark.slow

# Long enough trials (about a second per evaluation window on the tiny model) to be hit mid-way; no ASHA
# rung before the end, so every trial runs to max_steps and counts are exact.
MAX_CONCURRENT_TRIALS = 2  # experiments/tiny.yaml
LONG_TRIALS = ["budget.max_steps=60", "budget.eval_every=6", "scheduler.grace_period=60", "baseline=false"]


def started_trial_runs(output) -> dict:
    """Trial runs so far; empty until Tune started (the driver sets up the MLflow store before that)."""
    return trial_runs(output) if (output / "ray").exists() else {}


def finished_trials(output) -> int:
    return sum(run.info.status == "FINISHED" for run in started_trial_runs(output).values())


@pytest.mark.timeout(1800)  # its waits: 600 + 30 + 900 + 150 s
def test_resume_after_sigkill_of_the_driver_reruns_nothing(run_search, tmp_path):
    output = tmp_path / "search"
    first = run_search(LONG_TRIALS)
    wait_for(first, lambda: finished_trials(output) >= 1, timeout=600)
    os.kill(first.process.pid, signal.SIGKILL)
    first.wait(timeout=30)
    finished_before = {
        tid: metric_steps(output, run, "train_loss")
        for tid, run in trial_runs(output).items()
        if run.info.status == "FINISHED"
    }
    assert 1 <= len(finished_before) < 4

    # Resumed at once, as a user would, while Ray's agents of the killed driver still run: they notice the
    # dead raylet only after ~70 s and must be gone by the end.
    second = run_search(LONG_TRIALS, extra_args=["--resume"])
    assert second.wait(timeout=900) == 0, second.log()[-5000:]
    assert_no_survivors(first, grace=150)

    children = trial_runs(output)
    all_children = runs_by_role(output, "trial")
    assert len(all_children) == len(children) == 4, "a resumed search created duplicate child runs"
    assert len(runs_by_role(output, "search")) == 1
    assert all(run.info.status == "FINISHED" for run in children.values())
    for trial_id, steps in finished_before.items():
        assert metric_steps(output, children[trial_id], "train_loss") == steps, f"{trial_id} was run again"
    states = study_states(output)
    assert {states[trial_id] for trial_id in children} == {"COMPLETE"}
    # Suggestions asked for after Tune's last snapshot (one per concurrent slot at most) are never run by
    # Tune: they are failed, not left RUNNING.
    never_run = {trial_id: state for trial_id, state in states.items() if trial_id not in children}
    assert len(never_run) <= MAX_CONCURRENT_TRIALS and set(never_run.values()) <= {"FAIL"}, never_run
    assert_no_survivors(second)


@pytest.mark.timeout(1800)  # its waits: 600 + 120 + 900 s
def test_ctrl_c_stops_everything_and_the_search_resumes(run_search, tmp_path):
    output = tmp_path / "search"
    search = run_search(LONG_TRIALS)

    def some_trial_evaluated() -> bool:
        return any(metric_steps(output, run, "val_accuracy") for run in started_trial_runs(output).values())

    wait_for(search, some_trial_evaluated, timeout=600)
    os.killpg(search.process.pid, signal.SIGINT)  # what a terminal sends to the foreground group on Ctrl-C
    assert search.wait(timeout=120) == 130, search.log()[-5000:]
    assert "interrupted" in search.log()
    assert "Traceback" not in search.log()  # trial actors were ended before Ray, none printed its SIGTERM
    assert_no_survivors(search)
    assert runs_by_role(output, "search")[0].info.status == "KILLED"
    assert not [run for run in trial_runs(output).values() if run.info.status == "RUNNING"]

    resumed = run_search(LONG_TRIALS, extra_args=["--resume"])
    assert resumed.wait(timeout=900) == 0, resumed.log()[-5000:]
    assert len(runs_by_role(output, "trial")) == 4
    assert runs_by_role(output, "search")[0].info.status == "FINISHED"
    assert_no_survivors(resumed)
