"""What a user sees while `ptune-search search` runs: one progress view, the final table, the MLflow URL; the
libraries' chatter in the log file."""

from __future__ import annotations

import re

import pytest

from ptune_search.search.console import LOG_FILE

pytestmark = pytest.mark.slow

NUM_SAMPLES, MAX_STEPS, EVAL_EVERY = 4, 12, 3
MAX_CONSOLE_LINES = 60 + NUM_SAMPLES  # 60 lines plus one a trial, the JSON line of the outcome apart
PROGRESS = re.compile(r"^\s*\d+:\d\d (trial \d+|head sweep on the (bare text|template))\b")


def test_the_console_shows_progress_and_the_outcome_and_nothing_else(run_search, tmp_path):
    search = run_search()
    assert search.wait(timeout=900) == 0, search.log()[-5000:]
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
    log_file = tmp_path / "search" / LOG_FILE
    assert f"logs of Ray and the libraries: {log_file}" in search.log()
    assert log_file.stat().st_size > 0
