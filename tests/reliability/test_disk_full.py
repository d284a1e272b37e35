"""A full output disk: the search refuses to start without room, stops cleanly before writes fail when the
disk fills up mid-search, keeps every result it had, and ``--resume`` finishes it once space is freed.

The output disk is a small tmpfs mounted for the test (root only), filled by a ballast file.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import optuna
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from ptune_search.config import load_config
from ptune_search.pretrained import resolve_model
from ptune_search.search.disk_space import OutputDisk, OutputDiskFull, full_disk_reported, is_disk_full
from tests.search.search_process import TINY_CONFIG, SearchProcess, assert_no_survivors, wait_for
from tests.search.store_views import metric_steps, mlflow_client, runs_by_role, study_states, trial_runs
from tests.unavailable import unavailable

MIB = 1 << 20


def _mount_tmpfs(folder: Path, size_mib: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(folder)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        unavailable(f"cannot mount a tmpfs here (needs root): {completed.stderr.strip()}")


def _unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], check=True)  # busy: detach now, freed when released


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``small_disk(size_mib)``: a fresh tmpfs of that size, unmounted after the test whatever happened."""
    mounted: list[Path] = []

    def mount(size_mib: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        _mount_tmpfs(folder, size_mib)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        _unmount(folder)


def fill(disk: Path, leave_free: int) -> Path:
    """A ballast file that leaves ``leave_free`` bytes (to a page) free on ``disk``."""
    ballast = disk / "ballast"
    size = shutil.disk_usage(disk).free - leave_free
    with open(ballast, "wb") as file:
        os.posix_fallocate(file.fileno(), 0, max(size, 1))
    return ballast


def fill_completely(disk: Path) -> Path:
    ballast = disk / "ballast"
    with open(ballast, "ab") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return ballast


def tiny_disk_need(output_dir: Path, *overrides: str) -> OutputDisk:
    config = load_config(TINY_CONFIG, [f"output_dir={output_dir}", *overrides])
    return OutputDisk.for_search(config, resolve_model(config.model))


# --- refusing to start ---


def test_a_disk_without_room_for_one_round_is_refused_before_anything_starts(small_disk, tmp_path):
    disk = small_disk(8)
    output_dir = disk / "search"
    need = tiny_disk_need(output_dir)
    free = shutil.disk_usage(disk).free
    assert free < need.reserve_bytes  # the refusal below is about the room, not an accident

    search = SearchProcess(TINY_CONFIG, [f"output_dir={output_dir}"], tmp_path / "driver.log")
    try:
        assert search.wait(timeout=120) != 0
        log = search.log()
        assert "not enough free space to start the search" in log, log[-3000:]
        assert f"{output_dir} has {free / MIB:.1f} MiB ({free} bytes) free" in log
        assert f"needs at least {need.reserve_bytes / MIB:.1f} MiB ({need.reserve_bytes} bytes)" in log
        assert "Traceback" not in log
        assert not output_dir.exists()
        assert not search.seen, f"a refused search started processes: {search.seen}"
    finally:
        search.kill_everything()


# --- a full disk surfacing as an error anywhere in the driver ---


def test_enospc_of_a_plain_write_is_reported_as_a_full_disk(small_disk):
    disk = small_disk(1)
    need = OutputDisk(disk / "search", concurrent_trials=2, checkpoint_bytes=64 * 1024)
    with pytest.raises(OutputDiskFull) as info:
        with full_disk_reported(need):
            fill_completely(disk)
            (disk / "more").write_bytes(b"x" * 65536)
    message = str(info.value)
    assert message.startswith(f"the output disk is full: {disk / 'search'} has ")
    assert "the search failed: OSError: [Errno 28] No space left on device" in message
    assert "run the same command with --resume to continue" in message


def test_a_full_sqlite_store_is_recognised_under_mlflow_wrapping(small_disk):
    disk = small_disk(2)
    client = MlflowClient(f"sqlite:///{disk / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("full"))
    fill_completely(disk)
    with pytest.raises(MlflowException) as info:
        for batch in range(10_000):  # until sqlite needs a page it cannot get
            metrics = [Metric(f"m{batch}_{i}", float(i), 0, i) for i in range(1000)]
            client.log_batch(run.info.run_id, metrics=metrics)
    assert "database or disk is full" in str(info.value)
    assert is_disk_full(info.value)
    assert not is_disk_full(MlflowException("database is locked"))


# --- a disk filling up while trials run ---


SHORT_SEARCH = ["budget.num_samples=3", "baseline=false"]  # one trial finishes first, the rest after --resume


def finished_trial_runs(output_dir: Path) -> dict:
    if not (output_dir / "mlflow.db").exists() or not (output_dir / "ray").exists():
        return {}
    return {tid: run for tid, run in trial_runs(output_dir).items() if run.info.status == "FINISHED"}


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two tiny searches; each takes minutes when other jobs load the machine
def test_a_disk_filling_up_stops_the_search_cleanly_and_resume_finishes_it(small_disk, tmp_path):
    disk = small_disk(96)
    output_dir = disk / "search's"  # a quote in MLflow filters: resume finds the search's runs again
    overrides = [f"output_dir={output_dir}", *SHORT_SEARCH]
    need = tiny_disk_need(output_dir, *SHORT_SEARCH)
    first = SearchProcess(TINY_CONFIG, overrides, tmp_path / "first.log")
    try:
        wait_for(first, lambda: len(finished_trial_runs(output_dir)) >= 1, timeout=480)
        ballast = fill(disk, leave_free=need.reserve_bytes // 2)
        filled_at = time.monotonic()
        assert first.wait(timeout=180) != 0
        stop_seconds = time.monotonic() - filled_at
        log = first.log()
        assert "the output disk is full: " in log and "stopped before a write could fail" in log, log[-4000:]
        assert f"{output_dir} has " in log and "run the same command with --resume to continue" in log
        assert re.search(r"ptune-search search: error: the output disk is full", log)
        assert "Traceback" not in log
        assert "No space left on device" not in log and "database or disk is full" not in log  # no write failed
        assert_no_survivors(first)
    finally:
        first.kill_everything()
    print(f"the search stopped {stop_seconds:.1f} s after the disk filled")

    # What the search had stays readable: runs, metric histories, finished trials' artifacts, the study.
    finished = finished_trial_runs(output_dir)
    assert finished
    client = mlflow_client(output_dir)
    steps_before = {}
    for trial_id, run in finished.items():
        steps_before[trial_id] = metric_steps(output_dir, run, "val_accuracy")
        assert steps_before[trial_id][-1] == 12
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert {"prompt.safetensors", "head.safetensors", "ptune_config.json"} <= artifacts
    states = study_states(output_dir)
    assert all(states[trial_id] == "COMPLETE" for trial_id in finished), states
    optuna.load_study(study_name="search", storage=f"sqlite:///{output_dir / 'optuna.db'}").trials_dataframe()

    ballast.unlink()
    second = SearchProcess(TINY_CONFIG, overrides, tmp_path / "second.log", ["--resume"])
    try:
        assert second.wait(timeout=540) == 0, second.log()[-5000:]
        assert "Traceback" not in second.log()  # a search that ends prints no trial actor's shutdown either
        assert_no_survivors(second)
    finally:
        second.kill_everything()
    children = trial_runs(output_dir)
    assert len(children) == len(runs_by_role(output_dir, "trial")) == 3, "resume duplicated or lost trial runs"
    assert {run.info.status for run in children.values()} <= {"FINISHED", "KILLED"}
    for trial_id, steps in steps_before.items():
        assert metric_steps(output_dir, children[trial_id], "val_accuracy") == steps, f"{trial_id} ran again"
    (search_run,) = runs_by_role(output_dir, "search")
    assert search_run.info.status == "FINISHED"
