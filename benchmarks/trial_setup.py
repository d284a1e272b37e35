"""What a trial's setup costs, part by part, on a fresh trial actor and on a reused one (``reset_config``).

Both sides in one run, on one local swarm and one private Ray: (a) fresh trial actors, each a new process
that imports torch and transformers, loads the tokenizer and the client's weights and joins the swarm before
its first step; (b) one actor taking the same trials one after another, as Tune's ``reuse_actors`` does.
Prints JSON lines: the parts of a fresh setup timed in this process, each trial's setup on both sides, and
last the means and ``reused_over_fresh`` (mean reused setup / mean fresh setup, actor start included).

    python -m benchmarks.trial_setup [--model smollm2-135m] [--servers 2] [--trials 3]

``tests/test_benchmarks.py`` runs it on ``--model tiny-llama --servers 1 --trials 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Callable, TypeVar

import ray
import torch
from ray import tune
from transformers import AutoTokenizer

from ptune_search.data import TaskSpec, load_task
from ptune_search.models.distributed import _load_client_weights, distributed_config
from ptune_search.models.fingerprint import model_fingerprint
from ptune_search.models.registry import checkpoint_model_type, family_of
from ptune_search.pretrained import resolve_model
from ptune_search.search.trial import PromptTuningTrial, TrialSettings, ptune_config_of
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.client.remote_chain import RemoteBlockChain
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.protocol import ServedModel

T = TypeVar("T")

TRIALS = [
    {"tuning_mode": "ptune", "pre_seq_len": 16, "lr": 0.01, "prompt_init": "labels"},
    {"tuning_mode": "deep_ptune", "pre_seq_len": 8, "lr": 0.003, "prompt_init": "vocab"},
    {"tuning_mode": "ptune", "pre_seq_len": 4, "lr": 0.02, "prompt_init": "random"},
]


def timed(parts: dict[str, float], name: str, call: Callable[[], T]) -> T:
    started = time.perf_counter()
    value = call()
    parts[name] = round(time.perf_counter() - started, 3)
    return value


def setup_parts(model_path: str, settings: Any, config: dict[str, Any]) -> dict[str, float]:
    """A fresh setup's parts, one by one, with the functions ``PromptTuningTrial.setup`` calls."""
    parts: dict[str, float] = {}
    tokenizer = timed(parts, "tokenizer", lambda: AutoTokenizer.from_pretrained(model_path))
    ptune = ptune_config_of(config)
    family = family_of(checkpoint_model_type(model_path)).classifier_class
    model_settings = dict(num_labels=settings.task.num_labels, pad_token_id=tokenizer.pad_token_id)
    model_settings.update(**dataclasses.asdict(ptune), **dataclasses.asdict(settings.swarm))
    model_config = timed(
        parts, "config", lambda: distributed_config(family.base_class, model_path, None, model_settings)
    )
    served = timed(parts, "fingerprint", lambda: ServedModel(model_config.model_type, model_fingerprint(model_path)))
    chain = timed(parts, "swarm_join", lambda: RemoteBlockChain.connect(model_config, model=served))
    try:
        model = timed(parts, "model_construction", lambda: family(model_config, chain, torch.float32))
        timed(parts, "client_weights", lambda: _load_client_weights(model, model_path))
        timed(parts, "rebuilt_for_next_trial", lambda: model.rebuilt(**dataclasses.asdict(ptune)))
    finally:
        chain.close()

    class LocalTrial(PromptTuningTrial):
        def setup(self, config: dict[str, Any]) -> None:
            super().setup(config, settings=settings)

    trial = LocalTrial(dict(config))
    parts["whole_setup_in_process"] = round(trial.setup_s, 3)
    trial.reset_config(dict(config))
    parts["whole_reset_config"] = round(trial.setup_s, 3)
    trial.cleanup()
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model alias or checkpoint folder")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=len(TRIALS), choices=range(1, len(TRIALS) + 1))
    args = parser.parse_args()
    trials = TRIALS[: args.trials]
    model_path = str(resolve_model(args.model))
    task = load_task(
        TaskSpec(), AutoTokenizer.from_pretrained(model_path), 64, train_size=200, validation_size=50, seed=0
    )
    with LocalSwarm(model_path, servers=args.servers) as swarm:
        settings = TrialSettings(
            model_path,
            task,
            max_steps=10,
            eval_every=5,
            batch_size=8,
            seed=0,
            eval_batch_size=16,
            swarm=ClientConfig(initial_peers=swarm.initial_peers),
        )
        print(json.dumps({"benchmark": "trial_setup", "side": "parts", **setup_parts(model_path, settings, TRIALS[0])}))
        ray.init(address="local", include_dashboard=False, num_cpus=2)
        try:
            trial_class = ray.remote(num_cpus=1)(tune.with_parameters(PromptTuningTrial, settings=settings))
            fresh, reused = [], []
            for config in trials:
                started = time.perf_counter()
                actor = trial_class.remote(dict(config))
                ray.get(actor.get_current_ip_pid.remote())  # answers once setup is done
                fresh.append(time.perf_counter() - started)
                ray.kill(actor)
            actor = trial_class.remote(dict(trials[-1]))
            try:
                ray.get(actor.get_current_ip_pid.remote())
                for config in trials:
                    started = time.perf_counter()
                    assert ray.get(actor.reset.remote(dict(config)))
                    reused.append(time.perf_counter() - started)
            finally:
                ray.kill(actor)
        finally:
            ray.shutdown()
    for config, fresh_s, reused_s in zip(trials, fresh, reused):
        record = {"benchmark": "trial_setup", "side": "trial", **config, "fresh_actor_s": round(fresh_s, 3)}
        print(json.dumps({**record, "reused_actor_s": round(reused_s, 3)}))
    summary = {
        "benchmark": "trial_setup",
        "model": args.model,
        "fresh_actor_setup_s": round(statistics.mean(fresh), 3),
        "reused_actor_setup_s": round(statistics.mean(reused), 3),
        "reused_over_fresh": round(statistics.mean(reused) / statistics.mean(fresh), 4),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
