"""Chaos under a running search: the tiny-model search trains on a swarm with 2 servers for each span while a
seeded chaos loop SIGKILLs a random server every 60-120 s (and starts a replacement), SIGSTOPs one for 20 s
and kills the MLflow server for 30 s twice (``benchmarks.search_harness.chaos``).

The search runs as a user would (``ptune-search search experiments/tiny.yaml``, an external swarm, an
``mlflow server``); when it has finished, its stores are compared (``benchmarks.search_harness.figures``).
Prints one JSON line::

    {"benchmark": "chaos_search", "seed": 0, "plan": {...}, "elapsed_s": 912.4, "exit_code": 0,
     "chaos": {"kills": [...], "stalls": [...], "mlflow_outages": [...], "skipped": []},
     "trials": 40, "trials_failed": 0, "trial_failures": 0, "restores": 0, "mlflow_steps_lost": 0,
     "mlflow_steps_duplicated": 0, "optuna_mlflow_inconsistent": [], "survivors": [], "load_avg": [...]}

Targets: no trial failed, no MLflow step lost or duplicated, Optuna states agree with MLflow statuses, no
process outlives the search. Exits 1 when a target is missed.

Run: ``python -m benchmarks.chaos_search [--minutes 15] [--seed 0] [--trials 40] [--steps 300] [--work-dir DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.search_harness.chaos import ChaosLoop, ChaosPlan
from benchmarks.search_harness.figures import search_figures
from benchmarks.search_harness.mlflow_server import MlflowServer
from benchmarks.search_harness.search_process import TINY_CONFIG, SearchProcess, wait_for
from ptune_search.pretrained import resolve_model
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.server.settings import ServerSettings

SPANS, REPLICAS = 2, 2
FAST_RECORDS = ServerSettings(record_ttl=3.0, refresh_period=1.0)  # a dead server leaves routing within seconds
EXPERIMENT = "tiny"  # experiments/tiny.yaml


def search_overrides(output_dir: Path, swarm: LocalSwarm, tracking_uri: str, trials: int, steps: int) -> list[str]:
    """experiments/tiny.yaml with ``trials`` trials of at most ``steps`` steps (an evaluation and an ASHA rung
    every quarter of them); no baseline run; clients give up on a stalled server after 5 s; MLflow records
    wait out outages."""
    return [
        f"output_dir={output_dir}",
        "swarm.mode=external",
        f"swarm.initial_peers=[{', '.join(swarm.initial_peers)}]",
        "swarm.request_timeout=5",
        f"mlflow.tracking_uri={tracking_uri}",
        "mlflow.flush_timeout_s=600",
        f"budget.num_samples={trials}",
        f"budget.max_steps={steps}",
        f"budget.eval_every={steps // 4}",
        f"scheduler.grace_period={steps // 4}",
        "budget.max_failures=3",
        "baseline=false",
    ]


def run_chaos_search(work_dir: Path, plan: ChaosPlan, seed: int, trials: int, steps: int) -> dict[str, Any]:
    """Everything it starts is stopped before it returns, also when it fails. Size ``trials`` and ``steps``
    so that the search outlasts the plan: the chaos ends with the search."""
    os.environ["RAY_DEDUP_LOGS"] = "0"  # every line a trial prints reaches the driver's log
    load_before = os.getloadavg()
    swarm = LocalSwarm(
        resolve_model("tiny-llama"), SPANS * REPLICAS, REPLICAS, settings=FAST_RECORDS, log_dir=work_dir / "swarm"
    )
    mlflow = MlflowServer(work_dir / "mlflow")
    with swarm:
        mlflow.start()
        try:
            output_dir = work_dir / "search"
            overrides = search_overrides(output_dir, swarm, mlflow.uri, trials, steps)
            search = SearchProcess(TINY_CONFIG, overrides, work_dir / "driver.log")
            started = time.monotonic()
            try:
                # The chaos starts once trials train: a store down before the driver's first write is a refusal.
                wait_for(search, lambda: trials_reported(output_dir), timeout=900)
                chaos = ChaosLoop(swarm, mlflow, plan, seed).run(stop=lambda: search.process.poll() is not None)
                exit_code = search.wait(timeout=plan.seconds + 3600)
                elapsed = time.monotonic() - started
                survivors = search.survivors()
            finally:
                search.kill_everything()
            figures = search_figures(output_dir, mlflow.uri, EXPERIMENT, search.log())
        finally:
            mlflow.kill()
    return {
        "benchmark": "chaos_search",
        "seed": seed,
        "plan": dataclasses.asdict(plan),
        "elapsed_s": round(elapsed, 1),
        "exit_code": exit_code,
        "chaos": dataclasses.asdict(chaos),
        **figures,
        "survivors": survivors,
        "load_avg": [round(value, 2) for value in (*load_before, *os.getloadavg())],  # 1/5/15 min, before, after
    }


def trials_reported(output_dir: Path) -> bool:
    return any(path.stat().st_size for path in output_dir.glob("ray/search/*/result.json"))


def missed_targets(outcome: dict[str, Any]) -> list[str]:
    checks = {
        "the search exited 0": outcome["exit_code"] == 0,
        "no trial failed": outcome["trials_failed"] == 0 and outcome["trial_failures"] == 0,
        "no MLflow step lost": outcome["mlflow_steps_lost"] == 0,
        "no MLflow step duplicated": outcome["mlflow_steps_duplicated"] == 0,
        "no MLflow run duplicated": outcome["mlflow_runs_duplicated"] == 0,
        "Optuna agrees with MLflow": not outcome["optuna_mlflow_inconsistent"],
        "no process outlived the search": not outcome["survivors"],
    }
    return [target for target, held in checks.items() if not held]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=40, help="trials of the search (size it to last the run)")
    parser.add_argument("--steps", type=int, default=300, help="most steps of a trial (a tiny-model step: ~0.1 s)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a new temporary folder")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="chaos-search-"))
    outcome = run_chaos_search(work_dir, ChaosPlan(seconds=args.minutes * 60), args.seed, args.trials, args.steps)
    print(json.dumps(outcome), flush=True)
    missed = missed_targets(outcome)
    if missed:
        sys.exit(f"chaos_search missed: {', '.join(missed)} (work dir {work_dir})")


if __name__ == "__main__":
    main()
