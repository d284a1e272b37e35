"""The search's sampler against Optuna's RandomSampler at the same budget: the best trial's held-out test accuracy.

Each search is a fresh ``ptune-search search CONFIG`` process (its own Ray, swarm and MLflow store in a
scratch folder); the two samplers take turns, seed by seed (``search.sampler`` as configured, then
``random``), so a change in machine load hits both alike. Prints one JSON line per search, then one per
sampler with the mean and spread (sample standard deviation, min, max) of the best trial's test accuracy,
and a last line with the ratio of the means. Not run in CI: one search of the embedded default takes
about 15 minutes on 2 cores.

    python benchmarks/search_quality.py [--config experiments/smollm2_bbc_news.yaml] [--seeds 0 1 2]
        [--set budget.num_samples=4 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(config: str, sampler: str, seed: int, overrides: list[str], scratch: Path) -> dict:
    output = scratch / f"{sampler}-{seed}"
    args = [sys.executable, "-m", "ptune_search.cli", "search", config, "--set", f"output_dir={output}"]
    for override in [*overrides, f"seed={seed}", *([f"search.sampler={sampler}"] if sampler != "project" else [])]:
        args += ["--set", override]
    started = time.monotonic()
    completed = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    seconds = time.monotonic() - started
    if completed.returncode != 0:
        raise RuntimeError(f"search {sampler} seed {seed} failed:\n{completed.stderr[-3000:]}")
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    best = outcome["best_trial"]
    return {
        "sampler": sampler,
        "seed": seed,
        "best_test_accuracy": best.get("test_accuracy"),
        "best_val_accuracy": best["val_accuracy"],
        "baseline_test_accuracy": outcome.get("baseline_test_accuracy"),
        "best_params": {key: best[key] for key in ("tuning_mode", "pre_seq_len", "lr", "prompt_init")},
        "wall_s": round(seconds, 1),
        "load_average_1m": os.getloadavg()[0],
    }


def summary(sampler: str, runs: list[dict]) -> dict:
    values = [run["best_test_accuracy"] for run in runs]
    return {
        "sampler": sampler,
        "searches": len(values),
        "mean_best_test_accuracy": statistics.mean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "experiments" / "smollm2_bbc_news.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"project": [], "random": []}
    with tempfile.TemporaryDirectory(prefix="search-quality-") as scratch:
        for seed in args.seeds:
            for sampler in results:  # taken in turns
                run = run_one(args.config, sampler, seed, args.overrides, Path(scratch))
                results[sampler].append(run)
                print(json.dumps(run), flush=True)
    summaries = {sampler: summary(sampler, runs) for sampler, runs in results.items()}
    for line in summaries.values():
        print(json.dumps(line), flush=True)
    ratio = summaries["project"]["mean_best_test_accuracy"] / summaries["random"]["mean_best_test_accuracy"]
    print(json.dumps({"project_over_random_mean_best_test_accuracy": ratio}), flush=True)


if __name__ == "__main__":
    main()
