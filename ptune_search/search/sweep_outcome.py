"""What the head-only sweeps hand the search: the baseline to compare with, and the head every trial starts from.

The sweep on the bare text is the baseline (no prompt, its own learning rate). When the trials read a template,
a second sweep on their inputs fits the head they start from (linear probing, then fine-tuning: LP-FT), and the
trials train that head on at a fifth of the rate its sweep chose.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from ray import tune
from safetensors.torch import load_file

from ptune_search.models.prompt_folder import HEAD_FILE
from ptune_search.search.head_sweep import FINE_TUNE_LR_SCALE
from ptune_search.search.report import final_checkpoints, head_sweep_rows, validation_share


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    baseline: Optional[dict[str, Any]]  # the bare-text sweep's row, if the search has a baseline
    start: dict[str, Any]  # the row of the sweep every trial starts from
    start_head: torch.Tensor
    checkpoints: dict[str, tuple[dict[str, Any], tune.Checkpoint]]  # each sweep's best checkpoint
    validation_share: Optional[float]

    @property
    def head_lr(self) -> float:
        return self.start["lr"] * FINE_TUNE_LR_SCALE

    @property
    def start_row(self) -> Optional[dict[str, Any]]:
        """The template sweep's row, when it is not the baseline's (one sweep serves both without a template)."""
        return self.start if self.start is not self.baseline else None


def sweep_outcome(grid: tune.ResultGrid, metric: str, with_baseline: bool) -> SweepOutcome:
    sweeps = head_sweep_rows(grid, metric)
    checkpoints = final_checkpoints(grid)
    start = sweeps[False] if False in sweeps else sweeps[True]
    return SweepOutcome(
        baseline=sweeps[True] if with_baseline else None,
        start=start,
        start_head=_head_of(checkpoints[start["trial_id"]][1]),
        checkpoints=checkpoints,
        validation_share=validation_share(grid),
    )


def _head_of(checkpoint: tune.Checkpoint) -> torch.Tensor:
    """The head weight a sweep's (best) checkpoint holds."""
    with checkpoint.as_directory() as folder:
        return load_file(Path(folder) / HEAD_FILE)["score.weight"]
