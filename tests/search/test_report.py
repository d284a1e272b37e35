"""The search report's curves plot marks ASHA's rungs where Ray's ASHA has them."""

from __future__ import annotations

import pytest
from ray.tune.schedulers import ASHAScheduler

from ptune_search.search.report import asha_rungs


@pytest.mark.parametrize(("grace_period", "reduction_factor", "max_steps"), [(3, 2, 12), (10, 2, 30), (2, 3, 40)])
def test_rungs_are_rays_asha_milestones_before_the_last_step(grace_period: int, reduction_factor: int, max_steps: int):
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=max_steps,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        metric="val_accuracy",
        mode="max",
    )
    milestones = sorted(rung for rung, _ in scheduler._brackets[0]._rungs)  # Ray's own cut-off steps
    assert asha_rungs(grace_period, reduction_factor, max_steps) == [step for step in milestones if step < max_steps]
