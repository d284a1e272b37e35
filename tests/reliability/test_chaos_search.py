"""A short run of ``benchmarks/chaos_search.py``: servers killed and replaced, one stalled, MLflow down twice,
while a search trains on a swarm with two servers per span; nothing is lost, duplicated or left running."""

from __future__ import annotations

import pytest

from benchmarks.chaos_search import missed_targets, run_chaos_search
from benchmarks.search_harness.chaos import ChaosPlan

# Every kind of fault within the first 40 s of training (later events wait while MLflow restarts). The search
# must outlast that: each trial has up to 300 steps (about 0.1 s each, two trials at a time). In CI on
# 2026-12-07 the first two trials trained for 53 s under the chaos and the next two for 46 s; two more added
# 28 s and no fault.
SHORT_PLAN = ChaosPlan(seconds=40, kill_every_s=(15, 25), stall_s=8, mlflow_down_s=8, mlflow_outages=2)
TRIALS, STEPS = 4, 300


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_search_under_chaos_loses_no_trial_and_no_record(tmp_path):
    outcome = run_chaos_search(tmp_path, SHORT_PLAN, seed=0, trials=TRIALS, steps=STEPS)
    print(outcome)
    chaos = outcome["chaos"]
    assert chaos["kills"] and chaos["stalls"] and len(chaos["mlflow_outages"]) == 2, chaos
    assert outcome["trials"] == TRIALS
    assert outcome["mlflow_steps_expected"] > 0
    assert missed_targets(outcome) == [], outcome
    assert outcome["driver_tracebacks"] == 0
