"""The end of a search: a table of all trials, the best one, and plots (HTML files that MLflow carries too).

Every plot embeds plotly.js (about 4.8 MB a file) instead of loading it from a CDN or from a shared
``plotly.min.js`` beside it: a CDN leaves the plots blank on a machine without internet, and the MLflow UI
shows an HTML artifact on its own (a sandboxed iframe over a blob: URL), where no relative script can load.
Embedded, each file renders offline wherever it is opened: in the UI, downloaded alone, or in ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import optuna
import pandas as pd
import plotly.graph_objects as go
from ray import tune

logger = logging.getLogger(__name__)

OPTUNA_PLOTS = {
    "optuna_optimization_history.html": optuna.visualization.plot_optimization_history,
    "optuna_param_importances.html": optuna.visualization.plot_param_importances,
    "optuna_parallel_coordinate.html": optuna.visualization.plot_parallel_coordinate,
}
CURVES_PLOT = "val_accuracy_by_step.html"


@dataclasses.dataclass(frozen=True)
class TrialCurve:
    """A trial's validation metric at each evaluated step, and how the trial ended (as in ``trial_rows``)."""

    trial_id: str
    label: str
    steps: list[int]
    values: list[float]
    status: str


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


def trial_curves(grid: tune.ResultGrid, rows: list[dict[str, Any]], metric: str) -> list[TrialCurve]:
    """Every evaluation each trial reported to Tune (its result history), in step order."""
    status = {row["trial_id"]: row["status"] for row in rows}
    curves = []
    for result, row in zip(grid, rows):
        history = result.metrics_dataframe
        if history is None or metric not in history or "step" not in history:
            continue
        points = history[["step", metric]].dropna().drop_duplicates("step", keep="last").sort_values("step")
        label = f"{row['trial_id']} {row['tuning_mode']} P={row['pre_seq_len']} lr={row['lr']:.1e}"
        steps, values = points["step"].astype(int).tolist(), points[metric].astype(float).tolist()
        curves.append(TrialCurve(row["trial_id"], label, steps, values, status[row["trial_id"]]))
    return curves


def asha_rungs(grace_period: int, reduction_factor: float, max_steps: int) -> list[int]:
    """The steps at which ASHA compares trials and stops the weak ones: grace_period * reduction_factor**k,
    below max_steps (Ray's ASHA milestones; at max_steps every trial ends anyway)."""
    rungs, rung = [], float(grace_period)
    while rung < max_steps:
        rungs.append(int(rung))
        rung *= reduction_factor
    return rungs


def plot_curves(curves: list[TrialCurve], rungs: list[int], metric: str) -> go.Figure:
    """One line per trial against step; dashed verticals at ASHA's rungs; a cross where a trial was stopped."""
    figure = go.Figure()
    for curve in curves:
        stopped = curve.status != "finished"
        figure.add_trace(
            go.Scatter(
                x=curve.steps,
                y=curve.values,
                mode="lines+markers",
                name=f"{curve.label} ({curve.status})",
                line={"dash": "dot" if stopped else "solid"},
                marker={"symbol": ["circle"] * (len(curve.steps) - 1) + ["x" if stopped else "circle"], "size": 8},
            )
        )
    for rung in rungs:
        figure.add_vline(x=rung, line_dash="dash", line_color="grey", annotation_text=f"ASHA rung {rung}")
    figure.update_layout(
        title=f"{metric} by step, every trial (dotted and crossed: stopped early or failed)",
        xaxis_title="step",
        yaxis_title=metric,
    )
    return figure


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
    curves: list[TrialCurve],
    rungs: list[int],
) -> SearchReport:
    """Write ``trials.csv``, Optuna's plots and the curves plot (HTML) to ``output_dir``; print the summary."""
    table = pd.DataFrame(rows).sort_values(metric, ascending=False, na_position="last")
    csv_file = output_dir / "trials.csv"
    table.to_csv(csv_file, index=False)
    files = [csv_file]
    figures = {name: lambda plot=plot: plot(study) for name, plot in OPTUNA_PLOTS.items()}
    figures[CURVES_PLOT] = lambda: plot_curves(curves, rungs, metric)
    for name, figure in figures.items():
        try:
            figure().write_html(output_dir / name, include_plotlyjs=True)
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
