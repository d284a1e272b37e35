"""ASHA whose decisions do not depend on which trial reaches a rung first.

Ray's ASHA compares a trial at a rung with whatever trials happened to reach that rung before it, so the same
search can stop a trial in one run and keep it in the next (two trials at once interleave differently on a
busy machine). Here trial ``k`` is compared only with trials ``0 .. k - c`` (``c``: trials at once), which
:class:`~ptune_search.search.sampler.InOrderPrunedOptunaSearcher` guarantees had ended before trial ``k`` was
proposed: their rung values are final, so the decision is the same on every run. The rule is otherwise Ray's:
at each rung (``grace_period * reduction_factor ** n`` steps) a trial below the top ``1 / reduction_factor`` of
those values is stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


class OrderedASHA(FIFOScheduler):
    def __init__(self, rungs: list[int], reduction_factor: float, concurrency: int, time_attr: str = "step"):
        super().__init__()
        self.rungs, self.reduction_factor, self.concurrency, self.time_attr = (
            rungs,
            reduction_factor,
            concurrency,
            time_attr,
        )
        self.rung_metric: Optional[str] = None
        self.sign = 1.0
        self.order: list[str] = []  # trial ids in the order Tune added them (the order they were proposed)
        self.recorded: dict[int, dict[str, float]] = {rung: {} for rung in rungs}

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        if self.rung_metric and metric:
            return False
        self.rung_metric = metric or self.rung_metric
        self.sign = -1.0 if mode == "min" else 1.0
        return True

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if trial.trial_id not in self.order:  # a restored run adds its trials again
            self.order.append(trial.trial_id)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        step = result[self.time_attr]
        rung = next((r for r in reversed(self.rungs) if step >= r), None)
        if rung is None or trial.trial_id in self.recorded[rung]:
            return TrialScheduler.CONTINUE
        value = self.sign * float(result[self.rung_metric])
        self.recorded[rung][trial.trial_id] = value
        earlier = self.order[: max(0, self.order.index(trial.trial_id) - self.concurrency + 1)]
        peers = [self.recorded[rung][peer] for peer in earlier if peer in self.recorded[rung]]
        if peers and value < np.nanpercentile(peers, (1 - 1 / self.reduction_factor) * 100):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"OrderedASHA: rungs at {self.time_attr} {self.rungs}, trials compared in proposal order"
