"""The end of a search: a table of all trials, the best one, and Optuna's plots, as files for MLflow."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import optuna
import pandas as pd
from ray import tune

logger = logging.getLogger(__name__)

OPTUNA_PLOTS = {
    "optuna_optimization_history.html": optuna.visualization.plot_optimization_history,
    "optuna_param_importances.html": optuna.visualization.plot_param_importances,
    "optuna_parallel_coordinate.html": optuna.visualization.plot_parallel_coordinate,
}


@dataclasses.dataclass(frozen=True)
class SearchReport:
    summary: dict[str, float]
    files: list[Path]


def trial_rows(grid: tune.ResultGrid, metric: str) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        if result.error is not None:
            status = "failed"
        else:
            status = "finished" if metrics.get("finished") else "stopped early"
        rows.append(
            {
                "trial_id": metrics.get("trial_id", Path(result.path).name),
                "tuning_mode": result.config.get("tuning_mode"),
                "pre_seq_len": result.config.get("pre_seq_len"),
                "lr": result.config.get("lr"),
                "step": metrics.get("step"),
                "val_loss": metrics.get("val_loss"),
                metric: metrics.get(metric),
                "status": status,
            }
        )
    return rows


def best_finished_trial(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The best trial that ran its whole budget: an early-stopped trial's value is not comparable."""
    finished = [row for row in rows if row["status"] == "finished" and row[metric] is not None]
    if not finished:
        raise RuntimeError("no trial finished its budget; see the trial errors above")
    return max(finished, key=lambda row: row[metric])


def write_search_report(
    output_dir: Path,
    rows: list[dict[str, Any]],
    best: dict[str, Any],
    study: optuna.Study,
    baseline_accuracy: Optional[float],
    metric: str,
) -> SearchReport:
    """Write ``trials.csv`` and Optuna's HTML plots to ``output_dir`` and print the summary table."""
    table = pd.DataFrame(rows).sort_values(metric, ascending=False, na_position="last")
    csv_file = output_dir / "trials.csv"
    table.to_csv(csv_file, index=False)
    files = [csv_file]
    for name, plot in OPTUNA_PLOTS.items():
        try:
            plot(study).write_html(output_dir / name, include_plotlyjs="cdn")
            files.append(output_dir / name)
        except (ValueError, RuntimeError) as error:  # e.g. importances need two finished trials
            logger.warning("skipped %s: %s", name, error)
    summary = {f"best_{metric}": float(best[metric])}
    if baseline_accuracy is not None:
        summary[f"baseline_{metric}"] = float(baseline_accuracy)
    print("\nTrials:\n" + table.to_string(index=False))
    print(
        f"\nBest trial: {best['trial_id']} ({best['tuning_mode']}, pre_seq_len={best['pre_seq_len']}, "
        f"lr={best['lr']:.2e}) {metric}={best[metric]:.4f}"
    )
    if baseline_accuracy is not None:
        print(f"Head-only baseline with the same budget: {metric}={baseline_accuracy:.4f}")
    return SearchReport(summary, files)
