"""One seed, one search: the same config and seed give the same proposals, the same ASHA decisions and the same
best trial, however the trials running at once interleave (the second run has a busy core beside it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

# 6 trials, 2 at a time, rungs at steps 3 and 6 of 12: proposals after the startup depend on earlier outcomes, and
# ASHA has rungs to stop trials at.
OVERRIDES = ["budget.num_samples=6", "seed=2", "task.test_size=60"]
COMPARED = ["tuning_mode", "pre_seq_len", "lr", "prompt_init", "head", "step", "best_step", "status"]
FIGURES = ["val_accuracy", "val_loss", "test_accuracy"]


def _search(run_search, output: Path) -> pd.DataFrame:
    search = run_search(OVERRIDES, output_dir=output)
    assert search.wait(timeout=900) == 0, search.log()[-5000:]
    table = pd.read_csv(output / "trials.csv")
    return table.sort_values(["status", "lr"]).reset_index(drop=True)


def test_the_same_seed_gives_the_same_search_beside_a_busy_core(run_search, tmp_path):
    first = _search(run_search, tmp_path / "first")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        second = _search(run_search, tmp_path / "second")
    finally:
        busy.kill()
        busy.wait()
    assert "stopped early" in set(first["status"]), "ASHA stopped no trial: its decisions are not exercised"
    pd.testing.assert_frame_equal(first[COMPARED], second[COMPARED])
    pd.testing.assert_frame_equal(first[FIGURES], second[FIGURES], atol=1e-3, rtol=0)
