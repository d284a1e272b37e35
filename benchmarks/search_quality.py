"""What the search's best prompt adds over no prompt: the held-out test accuracy of the best trial against the
head-only baseline's (the bare text, no prompt, the same steps, its own learning rate), task by task, seed by seed.

Each search is a fresh ``ptune-search search CONFIG`` process (its own Ray, swarm and MLflow store in a scratch
folder). Prints one JSON line per search (the best trial's, the baseline's and the template head's test
accuracy; the trial every prompt starts from reads the template with a fitted head), then one last line with,
per task, ``min_gain_over_baseline``, ``mean_gain_over_baseline`` and ``mean_best_test_accuracy``. With
``--samplers project random`` each seed also runs with Optuna's RandomSampler (taken in turns, so machine load
hits both alike); the last line then holds the ratio of their mean best test accuracies.

Not run in CI at its default budget: one search of the embedded default takes about 15 minutes on 2 cores
(``tests/test_benchmarks.py`` runs it on the tiny model).

    python -m benchmarks.search_quality [--configs experiments/smollm2_bbc_news.yaml ...] [--seeds 0 1 2]
        [--samplers project random] [--set budget.num_samples=4 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [
    str(REPO / "experiments" / name) for name in ("smollm2_bbc_news.yaml", "smollm2_clothing_reviews.yaml")
]


def run_one(config: str, sampler: str, seed: int, overrides: list[str], scratch: Path) -> dict:
    output = scratch / f"{Path(config).stem}-{sampler}-{seed}"
    args = [sys.executable, "-m", "ptune_search.cli", "search", config, "--set", f"output_dir={output}"]
    for override in [*overrides, f"seed={seed}", *([f"search.sampler={sampler}"] if sampler != "project" else [])]:
        args += ["--set", override]
    started = time.monotonic()
    completed = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    seconds = time.monotonic() - started
    if completed.returncode != 0:
        raise RuntimeError(f"search {config} {sampler} seed {seed} failed:\n{completed.stderr[-3000:]}")
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    best = outcome["best_trial"]
    trials = pd.read_csv(output / "trials.csv")
    trials = trials[~trials["status"].isin(["baseline", "start head"])]
    return {
        "task": Path(config).stem,
        "sampler": sampler,
        "seed": seed,
        "best_test_accuracy": best.get("test_accuracy"),
        "baseline_test_accuracy": outcome.get("baseline_test_accuracy"),
        "start_head_test_accuracy": outcome.get("start_head_test_accuracy"),
        "gain_over_baseline": best["test_accuracy"] - outcome["baseline_test_accuracy"],
        "best_val_accuracy": best["val_accuracy"],
        "best_params": {key: best.get(key) for key in ("tuning_mode", "pre_seq_len", "lr", "head", "best_step")},
        # divergence: no trial's last evaluation should lose more than a model that knows nothing (ln classes)
        "max_last_eval_loss": float(trials["eval_loss"].max()),
        "chance_loss": math.log(num_classes(output)),
        "wall_s": round(seconds, 1),
        "load_average_1m": os.getloadavg()[0],
    }


def num_classes(output: Path) -> int:
    from ptune_search.config import load_config
    from ptune_search.data import TaskSpec, load_examples

    task = load_config(output / "config.yaml").task
    return len(load_examples(TaskSpec(task.name, task.text_column, task.label_column)).label_names)


def task_summary(runs: list[dict]) -> dict:
    gains = [run["gain_over_baseline"] for run in runs]
    return {
        "searches": len(runs),
        "min_gain_over_baseline": min(gains),
        "mean_gain_over_baseline": statistics.mean(gains),
        "mean_best_test_accuracy": statistics.mean(run["best_test_accuracy"] for run in runs),
        "mean_baseline_test_accuracy": statistics.mean(run["baseline_test_accuracy"] for run in runs),
        "mean_wall_s": statistics.mean(run["wall_s"] for run in runs),
        "diverged_searches": sum(run["max_last_eval_loss"] > run["chance_loss"] for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["project"], choices=["project", "random"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="search-quality-") as scratch:
        for config in args.configs:
            for seed in args.seeds:
                for sampler in args.samplers:  # taken in turns
                    runs.append(run_one(config, sampler, seed, args.overrides, Path(scratch)))
                    print(json.dumps(runs[-1]), flush=True)
    project = [run for run in runs if run["sampler"] == "project"]
    last: dict = {
        task: task_summary([r for r in project if r["task"] == task])
        for task in dict.fromkeys(r["task"] for r in project)
    }
    if "random" in args.samplers:
        mean = {s: statistics.mean(r["best_test_accuracy"] for r in runs if r["sampler"] == s) for s in args.samplers}
        last["project_over_random_mean_best_test_accuracy"] = mean["project"] / mean["random"]
    print(json.dumps(last), flush=True)


if __name__ == "__main__":
    main()
