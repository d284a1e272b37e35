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


HELD_OUT_METRICS = ("test_accuracy", "test_loss")
MAX_ERROR_CHARS = 500  # of a trial error quoted in the summary


class SearchFailed(RuntimeError):
    """No trial finished its budget; the message names the first trial error."""


@dataclasses.dataclass(frozen=True)
class SearchReport:
    summary: dict[str, float]
    files: list[Path]


def trial_id_of(result: tune.Result) -> str:
    return (result.metrics or {}).get("trial_id", Path(result.path).name)


def error_summary(error: BaseException) -> str:
    """The last line of an error (Ray wraps a trial's exception in a traceback; its last line names it)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text[:MAX_ERROR_CHARS]


def trial_rows(grid: tune.ResultGrid, metric: str) -> list[dict[str, Any]]:
    """One row per trial; a trial that never started (its actor failed) has no config and no metrics."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        if result.error is not None:
            status = "failed"
        else:
            status = "finished" if metrics.get("finished") else "stopped early"
        rows.append(
            {
                "trial_id": trial_id_of(result),
                "tuning_mode": config.get("tuning_mode"),
                "pre_seq_len": config.get("pre_seq_len"),
                "lr": config.get("lr"),
                "prompt_init": config.get("prompt_init"),
                "head": config.get("head"),
                "step": metrics.get("step"),
                "best_step": metrics.get("best_step"),
                "val_loss": metrics.get("val_loss"),
                "eval_loss": metrics.get("eval_loss"),  # the last evaluation's (the best may be earlier)
                metric: metrics.get(metric),
                "test_accuracy": None,
                "status": status,
                "error": error_summary(result.error) if result.error is not None else None,
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


def head_sweep_rows(grid: tune.ResultGrid, metric: str) -> dict[bool, dict[str, Any]]:
    """The head sweeps' rows by whether they read the bare text (the baseline) or the trials' template, each
    with the learning rate it chose; a failed sweep stops the search."""
    rows = {row["trial_id"]: row for row in trial_rows(grid, metric)}
    by_input = {}
    for result in grid:
        row = rows[trial_id_of(result)]
        if row["status"] != "finished":
            raise SearchFailed(f"the head-only sweep did not finish: {row['error'] or row['status']}")
        row["lr"] = result.metrics["baseline_lr"]
        by_input[bool(result.config.get("bare_text"))] = row
    return by_input


def final_checkpoints(grid: tune.ResultGrid) -> dict[str, tuple[dict[str, Any], tune.Checkpoint]]:
    """Trial id -> (its Tune config, its last checkpoint), for trials that have one."""
    return {trial_id_of(r): (r.config, r.checkpoint) for r in grid if r.config is not None and r.checkpoint}


def validation_share(grid: tune.ResultGrid) -> Optional[float]:
    """Of the time trials spent on training and validation, the share validation took (every result)."""
    train = validation = 0.0
    for result in grid:
        history = result.metrics_dataframe
        if history is not None and {"train_s", "eval_s"} <= set(history.columns):
            train += float(history["train_s"].sum())
            validation += float(history["eval_s"].sum())
    return validation / (train + validation) if train + validation > 0 else None


def best_finished_trial(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The best trial that ran its whole budget (an early-stopped trial's value is not comparable); equal
    accuracies are told apart by the lower validation loss."""
    finished = [row for row in rows if row["status"] == "finished" and row[metric] is not None]
    if not finished:
        failed = [row for row in rows if row["status"] == "failed"]
        first_error = next((row["error"] for row in failed if row["error"]), None)
        cause = f"; the first trial error: {first_error}" if first_error else ""
        raise SearchFailed(f"no trial finished its budget ({len(failed)} of {len(rows)} failed){cause}")
    return max(finished, key=lambda row: (row[metric], -(row["val_loss"] if row["val_loss"] is not None else 0.0)))


def write_search_report(
    output_dir: Path,
    rows: list[dict[str, Any]],
    best: dict[str, Any],
    study: optuna.Study,
    baseline: Optional[dict[str, Any]],
    metric: str,
    curves: list[TrialCurve],
    rungs: list[int],
    shares: dict[str, Optional[float]],
    start: Optional[dict[str, Any]] = None,
) -> SearchReport:
    """Write ``trials.csv``, Optuna's plots and the curves plot (HTML) to ``output_dir``; print the summary.

    Validation figures chose the best trial; test figures (held out) are the ones to quote. ``start`` is the head
    sweep on the trials' template, when it is not the baseline: what the template alone gives.
    """
    extra = [{**baseline, "status": "baseline"}] if baseline else []
    extra += [{**start, "status": "start head"}] if start else []
    table = pd.DataFrame(rows + extra)
    table = table.sort_values(metric, ascending=False, na_position="last")
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
            logger.info("skipped %s: %s", name, error)
    summary = _summary(best, baseline, start, shares, metric)
    _print_summary(table, best, baseline, start, shares, metric)
    return SearchReport(summary, files)


def _summary(
    best: dict[str, Any],
    baseline: Optional[dict[str, Any]],
    start: Optional[dict[str, Any]],
    shares: dict[str, Optional[float]],
    metric: str,
) -> dict[str, float]:
    """The parent run's summary metrics."""
    summary = {f"best_{metric}": float(best[metric])}
    if best.get("test_accuracy") is not None:
        summary["best_test_accuracy"] = float(best["test_accuracy"])
    if baseline is not None:
        summary[f"baseline_{metric}"] = float(baseline[metric])
        summary["baseline_lr"] = float(baseline["lr"])
        if baseline.get("test_accuracy") is not None:
            summary["baseline_test_accuracy"] = float(baseline["test_accuracy"])
    if start is not None:
        summary[f"start_head_{metric}"] = float(start[metric])
        if start.get("test_accuracy") is not None:
            summary["start_head_test_accuracy"] = float(start["test_accuracy"])
    summary.update({key: float(value) for key, value in shares.items() if value is not None})
    return summary


def _print_summary(
    table: pd.DataFrame,
    best: dict[str, Any],
    baseline: Optional[dict[str, Any]],
    start: Optional[dict[str, Any]],
    shares: dict[str, Optional[float]],
    metric: str,
) -> None:
    shown = table.drop(columns=["error"]) if table["error"].isna().all() else table
    print("\nTrials:\n" + shown.to_string(index=False))
    print(
        f"\nBest trial: {best['trial_id']} ({best['tuning_mode']}, pre_seq_len={best['pre_seq_len']}, "
        f"lr={best['lr']:.2e}, init {best['prompt_init']}, head {best['head']}, best at step {best['best_step']}) "
        f"{metric}={best[metric]:.4f}{_test(best)}"
    )
    if baseline is not None:
        print(
            f"Head-only baseline with the same budget (its own lr {baseline['lr']:.2e}): "
            f"{metric}={baseline[metric]:.4f}{_test(baseline)}"
        )
    if start is not None:
        print(
            f"Head alone on the template (every trial's start, lr {start['lr']:.2e}): "
            f"{metric}={start[metric]:.4f}{_test(start)}"
        )
    if shares.get("validation_share") is not None:
        print(f"Validation took {shares['validation_share']:.1%} of the trials' training + validation time")


def _test(row: dict[str, Any]) -> str:
    return f", test_accuracy={row['test_accuracy']:.4f}" if row.get("test_accuracy") is not None else ""
