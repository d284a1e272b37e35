"""How Optuna proposes trials: the search space, and a sampler whose model takes over after a short startup.

Optuna's TPE defaults to 10 random startup trials, more than a small search runs, which would make every
proposal random. Here the startup is sized to the budget (``SamplerConfig.startup_trials``), TPE models the
parameters jointly (multivariate) and, for trials that run at the same time, assumes the worst for the ones
still running (constant liar), so two concurrent proposals do not land on the same point.
"""

from __future__ import annotations

from typing import Any

import optuna

from ptune_search.config import ExperimentConfig


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
