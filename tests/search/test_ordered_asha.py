"""ASHA's decisions with two trials at once do not depend on which trial reaches a rung first."""

from __future__ import annotations

import itertools
import types

from ray.tune.schedulers import TrialScheduler

from ptune_search.search.ordered_asha import OrderedASHA

# val_accuracy at the step-3 rung of trials 0..3, proposed in this order, two at a time
AT_RUNG = {"t0": 0.8, "t1": 0.2, "t2": 0.5, "t3": 0.6}
CONCURRENCY = 2


def possible_orders() -> list[tuple[str, ...]]:
    """Every order in which the trials can reach the rung: trial k is proposed (so reaches the rung) only
    after trials 0 .. k - CONCURRENCY have ended (InOrderPrunedOptunaSearcher)."""
    names = list(AT_RUNG)
    return [
        order
        for order in itertools.permutations(names)
        if all(order.index(names[k - CONCURRENCY]) < order.index(names[k]) for k in range(CONCURRENCY, len(names)))
    ]


def decisions(order: tuple[str, ...]) -> dict[str, str]:
    asha = OrderedASHA(rungs=[3], reduction_factor=2, concurrency=CONCURRENCY)
    asha.set_search_properties("val_accuracy", "max")
    trials = {name: types.SimpleNamespace(trial_id=name) for name in AT_RUNG}
    for trial in trials.values():
        asha.on_trial_add(None, trial)
    return {
        name: asha.on_trial_result(None, trials[name], {"step": 3, "val_accuracy": AT_RUNG[name]}) for name in order
    }


def test_ordered_asha_stops_the_same_trials_in_every_interleaving_of_two_trials_at_once():
    orders = possible_orders()
    assert len(orders) > 1  # trials 0 and 1, 1 and 2, 2 and 3 may each reach the rung in either order
    expected = {
        "t0": TrialScheduler.CONTINUE,  # nothing before it
        "t1": TrialScheduler.CONTINUE,  # ran beside t0: compared with no one
        "t2": TrialScheduler.STOP,  # below t0, the one trial ended before it was proposed
        "t3": TrialScheduler.CONTINUE,  # 0.6 is above the median of t0 and t1 (0.5)
    }
    for order in orders:
        assert decisions(order) == expected, order
