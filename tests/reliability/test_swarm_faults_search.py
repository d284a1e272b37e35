"""A search whose swarm loses servers while trials train, run as a user would against a swarm the test controls.

One search meets two faults in turn (one search start is most of the cost): a server of a replicated span
dies, and no trial fails; then the only server of the other span dies, the trials fail on the missing block,
and once a replacement server joins, Tune restarts them from their checkpoints and the search finishes.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.reliability.swarm_fault_testing import run_search, start_swarm, tiny_llama  # noqa: F401 - fixtures
from tests.search.search_process import assert_no_survivors, wait_for
from tests.search.store_views import metric_steps, mlflow_client, study_states, trial_runs

MAX_STEPS, EVAL_EVERY = 24, 3
# Two trials at once, each evaluated every 3 steps and never stopped by ASHA, so that histories are exact.
# Restarts of a failed trial outlast a replacement server's start: each waits swarm.block_wait_timeout for it.
SHORT_SEARCH = [
    "budget.num_samples=2",
    f"budget.max_steps={MAX_STEPS}",
    f"budget.eval_every={EVAL_EVERY}",
    f"scheduler.grace_period={MAX_STEPS}",
    "baseline=false",
    "swarm.request_timeout=5",
    "swarm.block_wait_timeout=5",
    "budget.max_failures=20",
]


def external(swarm) -> list[str]:
    return ["swarm.mode=external", f"swarm.initial_peers=[{', '.join(swarm.initial_peers)}]"]


def every_trial_evaluated(output: Path, trials: int = 2) -> bool:
    """Both trials reported (and checkpointed) their first window, so the later one still has most to train.

    (Under load their actors may start far apart: the earlier may be done before the later began.)"""
    if not (output / "ray").exists():
        return False
    runs = trial_runs(output)
    return len(runs) == trials and all(metric_steps(output, run, "val_accuracy") for run in runs.values())


def evaluated_since(output: Path, since_ms: float) -> bool:
    """Some trial reported an evaluation after ``since_ms`` (epoch milliseconds)."""
    client = mlflow_client(output)
    return any(
        metric.timestamp > since_ms
        for run in trial_runs(output).values()
        for metric in client.get_metric_history(run.info.run_id, "val_accuracy")
    )


def tune_errors(output: Path) -> dict[str, list[str]]:
    """Trial folder name -> each failure Tune recorded in its error file."""
    files = output.glob("ray/search/*/error.txt")
    return {path.parent.name: path.read_text().split("Failure # ")[1:] for path in files}


@pytest.mark.slow
@pytest.mark.timeout(2100)  # its waits: 600 + 300 + 300 + 600 s, after a swarm's start
def test_trials_ride_out_a_dead_replica_and_resume_after_a_dead_span_is_replaced(start_swarm, run_search, tmp_path):
    swarm = start_swarm(2)  # blocks 0:2 and 2:4, one server each ...
    replica = swarm.start_server(0, 2)  # ... and a second server for blocks 0:2
    swarm.wait_until_online(2, blocks=(0, 2))
    output = tmp_path / "search"
    search = run_search([*SHORT_SEARCH, *external(swarm)])
    wait_for(search, lambda: every_trial_evaluated(output), timeout=600)

    # A replica dies: the clients re-route to the other one, and no trial fails.
    replica_killed_ms = time.time() * 1000
    swarm.kill_server(swarm.servers.index(replica), signal.SIGKILL)
    wait_for(search, lambda: evaluated_since(output, replica_killed_ms), timeout=300)
    assert tune_errors(output) == {}

    # The only server of blocks 2:4 dies: the trials fail on the missing block, until a replacement joins.
    swarm.kill_server(1, signal.SIGKILL)
    missing = f"no server is online for block {swarm.prefix}.2 "
    wait_for(search, lambda: any(missing in f for fs in tune_errors(output).values() for f in fs), timeout=300)
    swarm.start_server(2, 4)

    assert search.wait(timeout=600) == 0, search.log()[-5000:]
    # The clients met the dead replica (a warning in their actors' logs, whose folder the search prints) and went
    # on without it.
    actor_logs = Path(re.search(r"Logs of the trial processes: (\S+)", search.log()).group(1))
    logged = "".join(path.read_text(errors="replace") for path in actor_logs.glob("worker-*"))
    assert re.search(rf"(forward|backward) via 0:2@{replica.peer_id[-6:]} failed", logged), logged[-5000:]
    errors = tune_errors(output)
    assert errors, "no trial failed"
    cause = re.compile(rf"(MissingBlockError|SwarmRequestError): .*block {re.escape(swarm.prefix)}\.2\b")
    for failures in errors.values():  # each failure ends in an error naming the missing block: none other
        assert all(cause.search(failure.strip().splitlines()[-1]) for failure in failures), failures

    # Each trial finished, and each of its steps is in MLflow exactly once, however often it was restarted.
    runs = trial_runs(output)
    assert len(runs) == 2
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert metric_steps(output, run, "val_accuracy") == list(range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY))
        assert metric_steps(output, run, "train_loss") == list(range(1, MAX_STEPS + 1))
    assert set(study_states(output).values()) == {"COMPLETE"}
    # Tune restored the failed trials from their checkpoints, never from scratch.
    resumed_steps = [int(step) for step in re.findall(r"resumed trial at step (\d+)", logged)]
    assert len(resumed_steps) == sum(len(failures) for failures in errors.values())
    assert min(resumed_steps) >= EVAL_EVERY
    assert all(any(trial_id in folder for trial_id in runs) for folder in errors), "errors of unknown trials"
    assert_no_survivors(search)
