"""The search's sampler, run in Optuna directly on a cheap deterministic objective over the search's space."""

from __future__ import annotations

import math
import statistics

import optuna
import pytest

from ptune_search.config import parse_config
from ptune_search.search.sampler import SearchSpaceSampler, build_sampler, sampler_params

SPACE = SearchSpaceSampler(["ptune", "deep_ptune"], (4, 32), (1e-4, 3e-2), ("random", "labels"))
NUM_SAMPLES, SEEDS = 30, range(8)


def _config(sampler: str, seed: int = 0, **search):
    data = {"model": "tiny-llama", "search": {"sampler": sampler, **search}, "budget": {"num_samples": NUM_SAMPLES}}
    return parse_config({**data, "seed": seed}, check_paths=False)


def _score(params: dict) -> float:
    """A smooth landscape with one best region (lr 3e-3, 20 prompt tokens, deep_ptune, label init)."""
    return (
        -((math.log10(params["lr"]) + 2.5) ** 2)
        - ((params["pre_seq_len"] - 20) / 12) ** 2
        + (0.3 if params["tuning_mode"] == "deep_ptune" else 0.0)
        + (0.2 if params["prompt_init"] == "labels" else 0.0)
    )


def _best_value(sampler: optuna.samplers.BaseSampler) -> float:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for _ in range(NUM_SAMPLES):
        trial = study.ask()
        SPACE(trial)
        study.tell(trial, _score(trial.params))
    return study.best_value


def test_the_search_sampler_beats_random_search_at_the_same_budget():
    searched = [_best_value(build_sampler(_config("tpe", seed))) for seed in SEEDS]
    random = [_best_value(optuna.samplers.RandomSampler(seed=seed)) for seed in SEEDS]
    assert statistics.mean(searched) > statistics.mean(random) + 0.05, (searched, random)


def test_startup_is_fitted_to_the_budget_and_tpe_is_multivariate_with_a_constant_liar():
    sampler = build_sampler(_config("tpe"))
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == NUM_SAMPLES // 3 < NUM_SAMPLES
    assert sampler._multivariate and sampler._constant_liar
    assert sampler_params(_config("tpe"))["sampler.n_startup_trials"] == 10
    assert build_sampler(_config("tpe", n_startup_trials=3))._n_startup_trials == 3
    small = parse_config({"model": "tiny-llama", "budget": {"num_samples": 4}}, check_paths=False)
    assert small.search.startup_trials(small.budget.num_samples) == 2


@pytest.mark.parametrize(
    "kind, expected", [("gp", optuna.samplers.GPSampler), ("random", optuna.samplers.RandomSampler)]
)
def test_other_samplers_propose_over_the_same_space(kind, expected):
    sampler = build_sampler(_config(kind))
    assert isinstance(sampler, expected)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for _ in range(3):  # gp: 2 random startup trials, then one from the model
        trial = study.ask()
        SPACE(trial)
        study.tell(trial, _score(trial.params))
    assert {"tuning_mode", "pre_seq_len", "lr", "prompt_init"} == set(study.trials[-1].params)
