"""A trial actor Tune reuses (``reset_config``) trains exactly like a fresh one: real Ray actors, a real local
swarm on loopback, the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import ray
from ray import tune
from transformers import AutoTokenizer

from ptune_search.data import TaskSpec, load_task
from ptune_search.search.trial import PromptTuningTrial, TrialSettings
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.launcher import LocalSwarm

pytestmark = pytest.mark.slow

STEPS, EVAL_EVERY = 4, 2
FIRST = {"tuning_mode": "deep_ptune", "pre_seq_len": 3, "lr": 0.01, "prompt_init": "labels"}
LATER = [
    {"tuning_mode": "ptune", "pre_seq_len": 5, "lr": 0.02, "prompt_init": "random"},
    {"tuning_mode": "deep_ptune", "pre_seq_len": 2, "lr": 0.005, "prompt_init": "vocab"},
    {"tuning_mode": None, "pre_seq_len": 0, "baseline_lrs": [0.001, 0.01]},
]
DIVERGING = {"tuning_mode": "ptune", "pre_seq_len": 4, "lr": 1e12, "prompt_init": "random"}
UNSTARTABLE = {"tuning_mode": "ptune", "pre_seq_len": 100_000, "lr": 0.01, "prompt_init": "vocab"}


@pytest.fixture(scope="module")
def trial_class(tiny_model_path: Path) -> Iterator[Any]:
    """The trainable as Tune runs it (settings through ``tune.with_parameters``) as a Ray actor class, on a
    private Ray and a 2-server swarm."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    task = load_task(TaskSpec(), tokenizer, 32, train_size=24, validation_size=8, seed=0)
    with LocalSwarm(tiny_model_path, servers=2) as swarm:
        ray.init(address="local", include_dashboard=False, num_cpus=4)
        try:
            settings = TrialSettings(
                str(tiny_model_path),
                task,
                max_steps=STEPS,
                eval_every=EVAL_EVERY,
                batch_size=4,
                seed=0,
                eval_batch_size=8,
                swarm=ClientConfig(initial_peers=swarm.initial_peers),
            )
            yield ray.remote(num_cpus=1)(tune.with_parameters(PromptTuningTrial, settings=settings))
        finally:
            ray.shutdown()


def _train(actor: Any) -> list[dict[str, Any]]:
    return [ray.get(actor.train.remote()) for _ in range(STEPS // EVAL_EVERY)]


def _losses(results: list[dict[str, Any]]) -> list[float]:
    return [loss for result in results for loss in (*result["train_losses"], result["val_loss"])]


def _fresh_losses(trial_class: Any, config: dict[str, Any]) -> list[float]:
    actor = trial_class.remote(dict(config))
    try:
        return _losses(_train(actor))
    finally:
        ray.kill(actor)


def test_a_reused_actor_trains_each_trial_like_a_fresh_actor(trial_class):
    reused = trial_class.remote(dict(FIRST))
    try:
        pid = ray.get(reused.get_current_ip_pid.remote())[1]
        _train(reused)
        for config in LATER:
            assert ray.get(reused.reset.remote(dict(config))), "reset_config refused a trial of the same search"
            results = _train(reused)
            assert [r["step"] for r in results] == [EVAL_EVERY, STEPS], "steps count again from 0"
            assert [r["training_iteration"] for r in results] == [1, 2]
            assert {r["pid"] for r in results} == {pid}, "the trial ran on another process"
            assert _losses(results) == pytest.approx(_fresh_losses(trial_class, config), abs=1e-6), config
    finally:
        ray.kill(reused)


def test_a_trial_that_failed_on_an_actor_does_not_change_the_next_one(trial_class):
    """Tune discards the actor of a failed trial; were it reused, the next trial would still train as on a
    fresh actor, after a failure in training (the prompts diverged) as after one in ``reset_config``."""
    failed = trial_class.remote(dict(DIVERGING))
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="non-finite|loss is nan"):
            _train(failed)
        with pytest.raises(ray.exceptions.RayTaskError, match="distinct tokens in the training texts"):
            ray.get(failed.reset.remote(dict(UNSTARTABLE)))
        assert ray.get(failed.reset.remote(dict(LATER[0])))
        after_failures = _losses(_train(failed))
    finally:
        ray.kill(failed)
    assert after_failures == pytest.approx(_fresh_losses(trial_class, LATER[0]), abs=1e-6)
