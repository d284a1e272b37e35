"""`ptune-search demo`: a few prompt-tuning steps on local blocks, as a new user's first command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_trains_a_few_steps_and_prints_its_figures(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "ptune_search.cli", "demo", "--model", "tiny-llama", "--steps", "3"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])
    assert 0 <= result["accuracy_before"] <= 1 and 0 <= result["accuracy_after"] <= 1
    assert result["tokens_per_second"] > 0
    assert "validation accuracy after 3 steps" in done.stderr
