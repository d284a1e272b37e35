"""How Optuna proposes trials: the search space, a sampler whose model takes over after a short startup, and the
searcher that gives Tune Optuna's proposals and tells Optuna each trial's outcome in order, truthfully.

Optuna's TPE defaults to 10 random startup trials, more than a small search runs, which would make every
proposal random. Here the startup is sized to the budget (``SamplerConfig.startup_trials``), TPE models the
parameters jointly (multivariate) and, for trials that run at the same time, assumes the worst for the ones
still running (constant liar), so two concurrent proposals do not land on the same point.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any, Optional

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from ptune_search.config import ExperimentConfig

logger = logging.getLogger(__name__)

TUNE_TRIAL_ID_ATTR = "tune_trial_id"  # links a study's trial to its Tune trial and MLflow run


class SearchSpaceSampler:
    """Optuna's define-by-run space (a class, not a closure, so Tune can pickle the searcher on checkpoint).

    ``prompt_init`` and ``head`` are searched choices only when there are several; one is a fixed setting.
    """

    def __init__(
        self,
        tuning_modes: list[str],
        pre_seq_len: tuple[int, int],
        lr: tuple[float, float],
        prompt_inits: tuple[str, ...] = ("random",),
        heads: tuple[str, ...] = ("linear",),
    ):
        self.tuning_modes, self.pre_seq_len, self.lr = tuning_modes, pre_seq_len, lr
        self.prompt_inits, self.heads = prompt_inits, heads

    def __call__(self, trial: optuna.Trial) -> dict[str, Any] | None:
        trial.suggest_categorical("tuning_mode", self.tuning_modes)
        trial.suggest_int("pre_seq_len", *self.pre_seq_len)
        trial.suggest_float("lr", *self.lr, log=True)
        constants = {}  # Tune passes them to the trial's config
        for name, choices in (("prompt_init", self.prompt_inits), ("head", self.heads)):
            if len(choices) > 1:
                trial.suggest_categorical(name, list(choices))
            else:
                constants[name] = choices[0]
        return constants or None

    @classmethod
    def of(cls, config: ExperimentConfig) -> SearchSpaceSampler:
        space = config.search_space
        return cls(
            list(space.tuning_modes),
            (space.pre_seq_len.low, space.pre_seq_len.high),
            (space.lr.low, space.lr.high),
            tuple(space.prompt_init),
            tuple(space.heads),
        )


def build_sampler(config: ExperimentConfig) -> optuna.samplers.BaseSampler:
    """The sampler ``search.sampler`` names, seeded with the search's seed."""
    settings, seed = config.search, config.seed
    startup = settings.startup_trials(config.budget.num_samples)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def sampler_params(config: ExperimentConfig) -> dict[str, Any]:
    """The sampler's effective settings, for the search's MLflow run."""
    settings = config.search
    params: dict[str, Any] = {"sampler": settings.sampler, "sampler.seed": config.seed}
    if settings.sampler != "random":
        params["sampler.n_startup_trials"] = settings.startup_trials(config.budget.num_samples)
    if settings.sampler == "tpe":
        params.update({"sampler.multivariate": True, "sampler.constant_liar": True})
    return params


class InOrderPrunedOptunaSearcher(Searcher):
    """Optuna's proposals for Tune, told in trial order, with the trials ASHA stopped told as PRUNED.

    Ray's OptunaSearch tells the study each trial's outcome the moment it ends, so what trial ``k`` is proposed from
    depends on timing: on a busy machine the same seed proposes other learning rates. Here trial ``k`` is proposed
    once trials ``0 .. k - c`` (``c``: trials at once) have ended, from the study holding exactly those outcomes,
    told in trial order; trials ``k - c + 1 .. k - 1`` are RUNNING in it whether or not they have ended (the
    sampler's constant liar covers them). A slot may wait for an earlier trial to end: that is what the sameness
    costs. Intermediate values are told with the outcome, for the same reason.

    Outcomes are told truthfully: a trial ASHA stopped is PRUNED and a failed one FAIL (Ray's own tells any trial
    with a result as COMPLETE at its early value, which would let TPE learn from truncated runs as finished ones).

    Built on Tune's public ``Searcher`` interface and Optuna's ask-and-tell API. ``concurrency``: trials that run
    at once; ``num_samples``: trials of the search (after the last proposal, outcomes are told as trials end,
    in order).
    """

    def __init__(
        self,
        space: SearchSpaceSampler,
        sampler: optuna.samplers.BaseSampler,
        storage: optuna.storages.BaseStorage,
        study_name: str,
        metric: str,
        mode: str,
        *,
        concurrency: int,
        num_samples: int,
    ):
        super().__init__(metric=metric, mode=mode)
        self.space, self.concurrency, self.num_samples = space, concurrency, num_samples
        direction = "maximize" if mode == "max" else "minimize"
        self.study = optuna.create_study(
            storage=storage, sampler=sampler, study_name=study_name, direction=direction, load_if_exists=True
        )
        self.trials: dict[str, optuna.Trial] = {}  # by Tune trial id, in proposal order
        self.reports: dict[str, dict[int, float]] = {}  # intermediate values by step, told with the outcome
        self.outcomes: dict[str, tuple[TrialState, Optional[float]]] = {}  # ended, not yet told
        self.ended: set[str] = set()
        self.told = 0  # trials told so far: always a prefix of ``order``

    @property
    def order(self) -> list[str]:
        """Tune trial ids in proposal order."""
        return list(self.trials)

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec: Any) -> bool:
        return metric in (None, self.metric) and mode in (None, self.mode)

    def suggest(self, trial_id: str) -> Optional[dict]:
        if trial_id not in self.trials:
            if not self._tell_in_order(len(self.order) - self.concurrency):
                return None  # Tune asks again later
            trial = self.study.ask()
            trial.set_user_attr(TUNE_TRIAL_ID_ATTR, trial_id)
            self.trials[trial_id] = trial
        trial = self.trials[trial_id]
        constants = self.space(trial)  # define-by-run; asked again, it returns the same values
        return {**trial.params, **(constants or {})}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Every evaluation becomes an intermediate value at its optimizer step, so TPE can weigh a PRUNED trial
        by how far it got."""
        if trial_id not in self.ended:
            self.reports.setdefault(trial_id, {})[int(result["step"])] = float(result[self.metric])

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id in self.ended:
            return
        self.ended.add(trial_id)
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

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        """A driver killed between Optuna's ask and Tune's next snapshot leaves a study trial no Tune trial
        will ever run; it would stay RUNNING forever, so it is marked FAIL (Optuna's rule for stale trials)."""
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
        known = {trial.number for trial in self.trials.values()}
        for ghost in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if ghost.number not in known:
                logger.warning("Optuna trial %d was never run by Tune (driver killed); marking it FAIL", ghost.number)
                self.study.tell(ghost.number, state=TrialState.FAIL)

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
        trial = self.trials[trial_id]
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        if frozen.state.is_finished():
            return  # told before the driver was killed; Tune's older snapshot did not know
        for step, reported in sorted(self.reports.pop(trial_id, {}).items()):
            if step not in frozen.intermediate_values:
                trial.report(reported, step)
        self.study.tell(trial, value, state=state)
