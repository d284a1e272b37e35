"""The benchmarks run: each at a budget small enough for CI, on the tiny model, so they cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from benchmarks.search_quality import REPO


@pytest.mark.slow
def test_search_quality_prints_a_line_per_search_and_the_gains_per_task():
    tiny = str(REPO / "experiments" / "tiny.yaml")
    args = ["--configs", tiny, "--seeds", "0", "1", "--set", "budget.num_samples=2", "--set", "task.test_size=60"]
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.search_quality", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    *searches, last = [json.loads(line) for line in completed.stdout.strip().splitlines()]
    assert [(run["task"], run["seed"]) for run in searches] == [("tiny", 0), ("tiny", 1)]
    for run in searches:
        assert run["gain_over_baseline"] == pytest.approx(run["best_test_accuracy"] - run["baseline_test_accuracy"])
        assert run["chance_loss"] == pytest.approx(math.log(5)) and run["max_last_eval_loss"] > 0  # BBC: 5 classes
    gains = [run["gain_over_baseline"] for run in searches]
    assert last["tiny"]["min_gain_over_baseline"] == min(gains)
    assert last["tiny"]["diverged_searches"] == sum(r["max_last_eval_loss"] > r["chance_loss"] for r in searches)
    assert last["tiny"]["mean_gain_over_baseline"] == pytest.approx(sum(gains) / 2)
    assert last["tiny"]["mean_best_test_accuracy"] == pytest.approx(sum(r["best_test_accuracy"] for r in searches) / 2)
