"""Optuna proposals that do not depend on which trials happen to end first.

Ray's OptunaSearch tells the study each trial's outcome the moment it ends, so what trial ``k`` is proposed from
depends on timing: on a busy machine the same seed proposes other learning rates. Here trial ``k`` is proposed
once trials ``0 .. k - c`` (``c``: trials at once) have ended, from the study holding exactly those outcomes,
told in trial order; trials ``k - c + 1 .. k - 1`` are RUNNING in it whether or not they have ended (the
sampler's constant liar covers them). A slot may wait for an earlier trial to end: that is what the sameness
costs. Intermediate values are told with the outcome, for the same reason.

Outcomes are told truthfully: a trial ASHA stopped is PRUNED and a failed one FAIL (Ray's own tells any trial
with a result as COMPLETE at its early value, which would let TPE learn from truncated runs as finished ones).
"""

from __future__ import annotations

import logging
from typing import Optional

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)

TUNE_TRIAL_ID_ATTR = "tune_trial_id"


class OrderedOptunaSearch(OptunaSearch):
    """``concurrency``: trials that run at once; ``num_samples``: trials of the search (after the last proposal,
    outcomes are told as trials end, in order)."""

    def __init__(self, *args, concurrency: int, num_samples: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.concurrency, self.num_samples = concurrency, num_samples
        self.order: list[str] = []  # Tune trial ids in proposal order
        self.reports: dict[str, dict[int, float]] = {}  # intermediate values by step, told with the outcome
        self.outcomes: dict[str, tuple[TrialState, Optional[float]]] = {}  # ended, not yet told
        self.told = 0  # trials told so far: always a prefix of ``order``

    def suggest(self, trial_id: str) -> Optional[dict]:
        if trial_id not in self._ot_trials and not self._tell_in_order(len(self.order) - self.concurrency):
            return None  # Tune asks again later
        suggestion = super().suggest(trial_id)
        if trial_id not in self.order:
            self.order.append(trial_id)
            # links the study's trial to the Tune trial and its MLflow run
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID_ATTR, trial_id)
        return suggestion

    def restore(self, checkpoint_path: str) -> None:
        """A driver killed between Optuna's ask and Tune's next snapshot leaves a study trial no Tune trial
        will ever run; it would stay RUNNING forever, so it is marked FAIL (Optuna's rule for stale trials)."""
        super().restore(checkpoint_path)
        known = {ot_trial.number for ot_trial in self._ot_trials.values()}
        for ghost in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if ghost.number not in known:
                logger.warning("Optuna trial %d was never run by Tune (driver killed); marking it FAIL", ghost.number)
                self._ot_study.tell(ghost.number, state=TrialState.FAIL)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Every evaluation becomes an intermediate value at its optimizer step (Ray's own uses Tune's
        iteration count), so TPE can weigh a PRUNED trial by how far it got."""
        if trial_id not in self._completed_trials:
            self.reports.setdefault(trial_id, {})[int(result["step"])] = float(result[self.metric])

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        if not error and result and self.metric in result:
            # The result on which ASHA stopped a trial reaches the searcher here only, never in on_trial_result.
            self.reports.setdefault(trial_id, {})[int(result["step"])] = float(result[self.metric])
        if error:
            self.outcomes[trial_id] = (TrialState.FAIL, None)
        elif result and result.get("finished"):
            self.outcomes[trial_id] = (TrialState.COMPLETE, float(result[self.metric]))
        else:
            self.outcomes[trial_id] = (TrialState.PRUNED, None)
        if len(self.order) >= self.num_samples:  # nothing left to propose: tell what has ended, in order
            self._tell_in_order(len(self.order) - 1)

    def tell_ended(self) -> None:
        """Tell the study every outcome still held back, in any order: the search stopped (a full disk, Ctrl-C),
        and the study should show each ended trial as it ended. A resumed search may then propose from more
        outcomes than an uninterrupted one would have."""
        for trial_id in [trial_id for trial_id in self.order if trial_id in self.outcomes]:
            self._tell(trial_id, *self.outcomes.pop(trial_id))

    def _tell_in_order(self, last: int) -> bool:
        """Tell the study the outcomes of trials ``0 .. last`` in order; False while one of them still runs."""
        while self.told <= last:
            trial_id = self.order[self.told]
            if trial_id not in self.outcomes:
                return False
            self._tell(trial_id, *self.outcomes.pop(trial_id))
            self.told += 1
        return True

    def _tell(self, trial_id: str, state: TrialState, value: Optional[float]) -> None:
        ot_trial = self._ot_trials[trial_id]
        frozen = self._ot_study.get_trials(deepcopy=False)[ot_trial.number]
        if frozen.state.is_finished():
            return  # told before the driver was killed; Tune's older snapshot did not know
        for step, reported in sorted(self.reports.pop(trial_id, {}).items()):
            if step not in frozen.intermediate_values:
                ot_trial.report(reported, step)
        self._ot_study.tell(ot_trial, value, state=state)
