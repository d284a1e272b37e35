"""What the distributed search costs over a hand-written loop on one machine, and what concurrency buys.

Both sides run in one run, on the same machine, on the same trials:

(a) ``run_search`` with a fixed schedule: ``--trials`` trials (the sampler picks each one's tuning mode), ``--steps``
    steps each with an evaluation every ``--eval-every`` steps, no early stopping (ASHA's grace period is
    the whole budget), a local Ray, a local swarm of ``--servers`` servers (the embedded default's 1), 2
    concurrent trials, no baseline;
(b) the same trials (the parameters (a) ran), one after another in this process with local blocks and the
    same training code (``train_step``, ``evaluate``), driven by an Optuna study the way a user would write
    it by hand with Hugging Face and Optuna; its best trial is then evaluated on the held-out split, as in (a).

Then the aggregate training tokens/s of 1, 2, 4 and 8 trial-like client processes training at once on one
swarm (``benchmarks.swarm_step.throughput``). Prints JSON lines; the last is the summary::

    {"benchmark": "search_efficiency", "side": "search", "wall_s": ..., "breakdown_s": {...}, ...}
    {"benchmark": "search_efficiency", "side": "sequential", "wall_s": ..., ...}
    {"benchmark": "search_efficiency_concurrency", "clients": 4, "tokens_per_s": ...}
    {"benchmark": "search_efficiency_summary", "search_over_sequential": 0.93,
     "concurrent_over_local_throughput": 0.95, "tokens_per_s_by_concurrency": {...}, ...}

Run from the repository root: ``python -m benchmarks.search_efficiency [--model smollm2-135m] [--trials 4]
[--steps 20] [--eval-every 10]``. ``tests/test_benchmarks.py`` runs all of it on the tiny model, 2 trials of 2 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import optuna
import torch
from transformers import AutoTokenizer

from benchmarks.swarm_step import throughput
from ptune_search.config import parse_config
from ptune_search.data import TaskSpec, load_task
from ptune_search.pretrained import resolve_model
from ptune_search.search.driver import run_search
from ptune_search.search.trial import build_classifier, ptune_config_of
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.server.fair_queue import MergeLimits
from ptune_search.swarm.server.settings import ServerSettings
from ptune_search.training.steps import evaluate, train_step, trainable_parameters

MODES = ("ptune", "deep_ptune")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def search_config(args: argparse.Namespace, output_dir: Path):
    return parse_config(
        {
            "model": args.model,
            "task": {
                "name": "bbc_news",
                "max_length": args.max_length,
                "train_size": args.train_size,
                "validation_size": args.validation_size,
                "test_size": args.test_size,
            },
            "swarm": {"mode": "local", "servers": args.servers, "replicas": 1},
            "search_space": {
                "tuning_modes": list(MODES),
                "pre_seq_len": {"low": args.pre_seq_len, "high": args.pre_seq_len},
                "lr": {"low": args.lr, "high": args.lr},
            },
            "budget": {
                "num_samples": args.trials,
                "max_steps": args.steps,
                "eval_every": args.eval_every,
                "batch_size": args.batch_size,
                "max_concurrent_trials": 2,
            },
            "scheduler": {"grace_period": args.steps, "reduction_factor": 2},  # no early stopping
            "resources": {"cpu": 1},
            "baseline": False,
            "seed": 0,
            "mlflow": {"experiment_name": "search-efficiency"},
            "output_dir": str(output_dir),
        }
    )


def trial_results(output_dir: Path) -> list[list[dict[str, Any]]]:
    """Each trial's results, in Tune's result.json files, ordered by the trial's start."""
    trials = []
    for path in sorted((output_dir / "ray" / "search").glob("*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            trials.append(lines)
    return sorted(trials, key=lambda results: results[0]["setup_started"])


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def run_distributed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """(a): the search, timed as a whole and broken down from its trials' results."""

    output_dir = work / "search"
    config = search_config(args, output_dir)
    started = time.time()
    outcome = run_search(config)
    wall = time.time() - started
    trials = trial_results(output_dir)
    first_setup = min(results[0]["setup_started"] for results in trials)
    train_intervals, active_intervals, setup, train, evaluation, tokens = [], [], 0.0, 0.0, 0.0, 0
    for results in trials:
        setup += results[0]["setup_s"]
        active_intervals.append((results[0]["setup_started"], results[-1]["reported_at"]))
        for result in results:
            train_end = result["reported_at"] - result["eval_s"]
            train_intervals.append((train_end - result["train_s"], train_end))
            train += result["train_s"]
            evaluation += result["eval_s"]
            tokens += result["train_tokens"]
    busy = union_seconds(train_intervals)
    start = first_setup - started
    after = started + wall - max(results[-1]["reported_at"] for results in trials)
    return {
        "benchmark": "search_efficiency",
        "side": "search",
        "wall_s": round(wall, 1),
        # wall time until the first trial starts, while trials run, when none runs between them, and after
        # the last (the held-out test of the best trial, the MLflow model of its prompt, reports, shutdown)
        "wall_breakdown_s": {
            "start_ray_swarm_model": round(start, 1),
            "trials_running": round(union_seconds(active_intervals), 1),
            "between_trials": round(wall - start - union_seconds(active_intervals) - after, 1),
            "after_trials": round(after, 1),
        },
        # the trials' own time, summed over trials (2 run at once)
        "trial_breakdown_s": {
            "setup": round(setup, 1),
            "training": round(train, 1),
            "validation": round(evaluation, 1),
        },
        "trial_seconds_summed": round(setup + train + evaluation, 1),
        "train_tokens": tokens,
        "aggregate_train_tokens_per_s": round(tokens / busy, 1),
        "trials": [
            {key: results[0]["config"][key] for key in ("tuning_mode", "pre_seq_len", "lr")} for results in trials
        ],
        "best_val_accuracy": outcome.best_trial.get("val_accuracy"),
        "best_test_accuracy": outcome.best_trial.get("test_accuracy"),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def run_sequential(args: argparse.Namespace, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """(b): the same trials one after another, local blocks, a plain loop driven by Optuna."""

    started = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    model_path = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    task = load_task(TaskSpec(), tokenizer, args.max_length, args.train_size, args.validation_size, 0, args.test_size)
    totals = {"training": 0.0, "validation": 0.0, "tokens": 0}
    models: dict[int, torch.nn.Module] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {
            "tuning_mode": trial.suggest_categorical("tuning_mode", list(MODES)),
            "pre_seq_len": trial.suggest_int("pre_seq_len", 1, 1024),
            "lr": trial.suggest_float("lr", 1e-6, 1.0, log=True),
        }
        torch.manual_seed(0)
        model = build_classifier(model_path, task.num_labels, tokenizer.pad_token_id, ptune_config_of(params), None)
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=params["lr"])
        batches = task.train_batches(args.batch_size, 0)
        accuracy = 0.0
        for step in range(1, args.steps + 1):
            step_started = time.perf_counter()
            totals["tokens"] += train_step(model, optimizer, next(batches)).tokens
            totals["training"] += time.perf_counter() - step_started
            if step % args.eval_every == 0 or step == args.steps:
                eval_started = time.perf_counter()
                accuracy = evaluate(model, task.validation, args.batch_size).accuracy
                totals["validation"] += time.perf_counter() - eval_started
        models[trial.number] = model
        return accuracy

    study = optuna.create_study(direction="maximize")
    for params in trials:
        study.enqueue_trial(params)
    study.optimize(objective, n_trials=len(trials))
    test_started = time.perf_counter()  # the best trial on the held-out split, as (a) does after its trials
    test_accuracy = evaluate(models[study.best_trial.number], task.test, args.batch_size).accuracy
    held_out = time.perf_counter() - test_started
    wall = time.time() - started
    return {
        "benchmark": "search_efficiency",
        "side": "sequential",
        "wall_s": round(wall, 1),
        "breakdown_s": {
            "setup": round(wall - totals["training"] - totals["validation"] - held_out, 1),
            "training": round(totals["training"], 1),
            "validation": round(totals["validation"], 1),
            "held_out_test": round(held_out, 1),
        },
        "train_tokens": totals["tokens"],
        "aggregate_train_tokens_per_s": round(totals["tokens"] / totals["training"], 1),
        "best_val_accuracy": study.best_value,
        "best_test_accuracy": test_accuracy,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def run_concurrency(args: argparse.Namespace) -> dict[int, float]:
    """Aggregate tokens/s of 1, 2, 4, 8 trial-like clients training at once on one swarm."""

    path = resolve_model(args.model)
    rates: dict[int, list[float]] = {clients: [] for clients in args.concurrency}
    settings = ServerSettings(merge=MergeLimits(max_tokens=0)) if args.no_merge else ServerSettings()
    with LocalSwarm(path, servers=args.servers, settings=settings) as swarm:
        for _ in range(args.rounds):
            for clients in args.concurrency:
                record = throughput(path, swarm.initial_peers, clients, "ptune", args.concurrency_steps, threads=1)
                record["benchmark"] = "search_efficiency_concurrency"
                record["merging"] = not args.no_merge
                emit(record)
                rates[clients].append(record["tokens_per_s"])
    return {clients: statistics.median(values) for clients, values in rates.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model alias or checkpoint folder")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="training steps per trial")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--validation-size", type=int, default=150)
    parser.add_argument("--test-size", type=int, default=300, help="held-out examples; (a) and (b) test the best")
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8], help="concurrent trial counts")
    parser.add_argument("--concurrency-steps", type=int, default=3, help="measured steps per client")
    parser.add_argument("--rounds", type=int, default=1, help="measure every concurrency this many times")
    parser.add_argument("--servers", type=int, default=1, help="block servers, the blocks split evenly")
    parser.add_argument("--no-merge", action="store_true", help="servers never merge requests (a baseline)")
    parser.add_argument("--concurrency-only", action="store_true", help="skip (a) and (b)")
    args = parser.parse_args(argv)
    if args.concurrency_only:
        rates = run_concurrency(args)
        emit(
            {
                "benchmark": "search_efficiency_concurrency_summary",
                "merging": not args.no_merge,
                "tokens_per_s_by_concurrency": {str(c): round(r, 1) for c, r in rates.items()},
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
        return

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as work:
        distributed = run_distributed(args, Path(work))
    emit(distributed)
    sequential = run_sequential(args, distributed["trials"])
    emit(sequential)
    rates = run_concurrency(args) if args.concurrency else {}
    summary = {
        "benchmark": "search_efficiency_summary",
        "model": args.model,
        "trials": args.trials,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "search_over_sequential": round(distributed["wall_s"] / sequential["wall_s"], 3),
        "concurrent_over_local_throughput": round(
            distributed["aggregate_train_tokens_per_s"] / sequential["aggregate_train_tokens_per_s"], 3
        ),
        "tokens_per_s_by_concurrency": {str(clients): round(rate, 1) for clients, rate in rates.items()},
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }
    if 2 in rates and 4 in rates:
        summary["four_over_two_concurrent"] = round(rates[4] / rates[2], 3)
    emit(summary)


if __name__ == "__main__":
    sys.exit(main())
