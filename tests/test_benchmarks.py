"""The benchmarks run: each at a budget small enough for CI, on the tiny model, so they cannot rot.

Each runs as the docs say, ``python -m benchmarks.<name>`` from the repository root, in its own process whose
every descendant (swarm servers, p2p daemons, Ray) is ended by the test. The figures are only checked to be
there and sane: their values on the tiny model mean nothing.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest

from benchmarks.search_harness.search_process import REPO, WatchedProcess, assert_no_survivors, wait_for
from benchmarks.wan import network as wan_network

BENCHMARKS = sorted(path.stem for path in (REPO / "benchmarks").glob("*.py") if path.stem != "__init__")


def short_runs() -> set[str]:
    """Benchmarks that some test runs: as ``run_benchmark(NAME``, ``benchmarks.NAME`` or ``benchmarks/NAME.py``."""
    text = "\n".join(path.read_text() for path in (REPO / "tests").rglob("*.py"))
    return set(re.findall(r'run_benchmark\(\s*"(\w+)"', text)) | set(re.findall(r"benchmarks[./](\w+)", text))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_imports_and_has_a_short_run_in_the_tests(name: str):
    importlib.import_module(f"benchmarks.{name}")  # imports sit at the top: a broken one fails here, at once
    assert name in short_runs(), f"benchmarks/{name}.py has no short run in tests/ (see tests/test_benchmarks.py)"


def run_benchmark(name: str, args: Sequence[str], tmp_path: Path, timeout: float = 600) -> list[dict[str, Any]]:
    """The JSON lines ``python -m benchmarks.<name> ARGS`` printed (libraries may print other lines too)."""
    stdout = tmp_path / f"{name}.out"
    benchmark = WatchedProcess([sys.executable, "-m", f"benchmarks.{name}", *args], tmp_path / f"{name}.log", stdout)
    try:
        assert benchmark.wait(timeout) == 0, benchmark.log()[-5000:]
        assert_no_survivors(benchmark)
    finally:
        benchmark.kill_everything()
    lines = stdout.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{") and '"benchmark"' in line]


def of(records: list[dict[str, Any]], benchmark: str) -> list[dict[str, Any]]:
    return [record for record in records if record["benchmark"] == benchmark]


def assert_positive(record: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, record)


def assert_finite(figures: dict[str, Any]) -> None:
    for key, value in figures.items():
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, figures)


def test_trial_footprint_measures_a_whole_model_process_and_a_trial_client(tmp_path):
    records = run_benchmark("trial_footprint", ["--model", "tiny-llama", "--servers", "1"], tmp_path)
    whole, client = of(records, "trial_footprint")
    (summary,) = of(records, "trial_footprint_summary")
    for process in (whole, client):
        assert_positive(process, "peak_rss_mib", "start_to_first_step_s", "parameters_in_process")
    assert client["parameters_in_process"] < whole["parameters_in_process"]  # the blocks stay on the swarm
    assert summary["rss_ratio_client_over_whole"] == pytest.approx(client["peak_rss_mib"] / whole["peak_rss_mib"])
    assert_positive(summary, "rss_ratio_client_over_whole", "first_step_ratio_client_over_whole")


def test_swarm_step_compares_local_and_swarm_steps_and_measures_concurrent_clients(tmp_path):
    args = ["--model", "tiny-llama", "--steps", "1", "--clients", "1", "2", "--throughput-steps", "1", "--rounds", "1"]
    records = run_benchmark("swarm_step", args, tmp_path)
    steps = of(records, "swarm_step")
    assert [step["mode"] for step in steps] == ["ptune", "deep_ptune"]
    for step in steps:
        assert_positive(step, "local_median_s", "swarm_median_s", "ratio", "paired_ratio_median")
        assert step["failed_calls"] == 0 and step["swarm_recomputes"] == 0
    throughputs = of(records, "swarm_throughput")
    assert [record["clients"] for record in throughputs] == [1, 2]
    for record in throughputs:
        assert record["tokens"] == record["clients"] * 1 * 8 * 64  # clients x steps x batch x tokens
        assert_positive(record, "wall_s", "tokens_per_s", "tokens_per_s_first_to_last")
    alone = throughputs[0]  # one client is in flight from its first step to its last
    assert alone["tokens_per_s"] == pytest.approx(alone["tokens_per_s_first_to_last"], abs=0.2)
    (summary,) = of(records, "swarm_throughput_summary")
    assert set(summary["median_tokens_per_s"]) == {"1", "2"}
    assert_positive(summary["median_tokens_per_s"], "1", "2")
    assert_positive(summary, "ratio_2_to_1_clients")


def test_core_use_splits_the_cores_by_role_while_clients_train(tmp_path):
    args = ["--model", "tiny-llama", "--clients", "1", "2", "--steps", "40"]
    records = run_benchmark("core_use", args, tmp_path)
    uses = of(records, "core_use")
    assert [record["clients"] for record in uses] == [1, 2]
    for record in uses:
        assert {"server", "client", "p2pd"} <= set(record["core_s_by_role"]), record
        assert_positive(record, "tokens_per_s", "window_s", "server_cpu_ms_per_token")
        assert 0 <= record["idle_share"] < 1
        assert sum(record["core_s_by_role"].values()) <= os.cpu_count() * record["window_s"] * 1.1  # the cores
        requests = record["clients"] * 41 * 2 * 2  # clients x steps with warm-up x (forward, backward) x servers
        assert record["server_tasks"] + record["requests_in_merged_batches"] - record["merged_batches"] == requests
    (local,) = of(records, "core_use_local")
    assert_positive(local, "tokens_per_s", "cpu_ms_per_token")


def test_half_wire_trains_alike_with_every_wire_dtype(tmp_path):
    records = run_benchmark("half_wire", ["--model", "tiny-llama", "--steps", "2", "--validation-size", "10"], tmp_path)
    runs = {run["wire_dtype"]: run for run in of(records, "half_wire")}
    assert list(runs) == ["float32", "float16", "bfloat16"]
    for run in runs.values():
        assert len(run["losses"]) == 2 and all(math.isfinite(loss) and loss > 0 for loss in run["losses"])
        assert_positive(run, "val_loss", "median_step_s")
        assert 0 <= run["val_accuracy"] <= 1
    (summary,) = of(records, "half_wire_summary")
    differences = summary["max_loss_difference"]
    assert differences["float32"] == 0
    assert_finite(differences)
    assert max(differences.values()) < 0.1  # 16-bit hidden states change the loss a little, not the training


def test_generation_compares_sessions_no_cache_and_local_with_the_same_greedy_tokens(tmp_path):
    args = ["--model", "tiny-llama", "--input-tokens", "12", "--new-tokens", "6", "--rounds", "1"]
    args += ["--sessions", "3", "--sessions-batch", "2"]
    records = run_benchmark("generation", args, tmp_path)
    runs = of(records, "generation")
    assert [(run["way"], run["batch"]) for run in runs] == [
        (way, batch) for batch in (1, 8) for way in ("session", "no_cache", "local")
    ]
    for run in runs:
        assert (run["input_tokens"], run["new_tokens"]) == (12, 6)
        assert_positive(run, "wall_s", "tokens_per_s", "ms_per_step")
    (memory,) = of(records, "generation_sessions_memory")
    assert (memory["sessions"], memory["batch"], memory["max_length"]) == (3, 2, 18)
    for server in memory["servers"]:
        assert server["peak_open_sessions"] >= 1 and server["peak_reserved_mib"] <= memory["budget_mib"]
        assert server["growth_within_budget"]
        assert sum(server["ended"].values()) >= 3  # every session ended (and the speed runs' too)
    (summary,) = of(records, "generation_summary")
    assert summary["same_tokens"] == {"1": True, "8": True}  # the three ways generate the same greedy tokens
    for ratios in (summary["session_over_local"], summary["session_over_no_cache"]):
        assert set(ratios) == {"1", "8"}
        assert_positive(ratios, "1", "8")


@pytest.mark.slow  # a private Ray and fresh trial actors
def test_trial_setup_times_fresh_and_reused_trial_actors(tmp_path):
    args = ["--model", "tiny-llama", "--servers", "1", "--trials", "2"]
    records = run_benchmark("trial_setup", args, tmp_path)
    parts, *trials, summary = of(records, "trial_setup")
    assert parts["side"] == "parts" and [trial["side"] for trial in trials] == ["trial", "trial"]
    assert_finite({key: value for key, value in parts.items() if key not in ("benchmark", "side")})
    assert_positive(parts, "swarm_join", "client_weights", "whole_setup_in_process", "whole_reset_config")
    for trial in trials:
        assert_positive(trial, "fresh_actor_s", "reused_actor_s")
    assert_positive(summary, "fresh_actor_setup_s", "reused_actor_setup_s", "reused_over_fresh")


@pytest.mark.slow  # a whole search on a private Ray, then the same trials in a loop, then concurrent clients
def test_search_efficiency_runs_both_sides_and_the_concurrency_sweep_in_one_run(tmp_path):
    args = ["--model", "tiny-llama", "--trials", "2", "--steps", "2", "--eval-every", "1", "--batch-size", "4"]
    args += ["--max-length", "16", "--train-size", "40", "--validation-size", "10", "--test-size", "10"]
    args += ["--pre-seq-len", "2", "--concurrency", "1", "2", "--concurrency-steps", "1"]
    records = run_benchmark("search_efficiency", args, tmp_path)
    search, sequential = of(records, "search_efficiency")
    assert (search["side"], sequential["side"]) == ("search", "sequential")
    assert len(search["trials"]) == 2
    for side in (search, sequential):
        assert_positive(side, "wall_s", "train_tokens", "aggregate_train_tokens_per_s")
        assert 0 <= side["best_test_accuracy"] <= 1
    assert_finite(search["wall_breakdown_s"])
    assert_finite(search["trial_breakdown_s"])
    assert_finite(sequential["breakdown_s"])
    assert [record["clients"] for record in of(records, "search_efficiency_concurrency")] == [1, 2]
    (summary,) = of(records, "search_efficiency_summary")
    assert_positive(summary, "search_over_sequential", "concurrent_over_local_throughput")
    assert set(summary["tokens_per_s_by_concurrency"]) == {"1", "2"}
    assert_positive(summary["tokens_per_s_by_concurrency"], "1", "2")


@pytest.mark.slow
def test_search_quality_prints_a_line_per_search_and_the_gains_per_task(tmp_path):
    tiny = str(REPO / "experiments" / "tiny.yaml")
    args = ["--configs", tiny, "--seeds", "0", "1", "--set", "budget.num_samples=2", "--set", "task.test_size=60"]
    stdout = tmp_path / "search_quality.out"
    benchmark = WatchedProcess([sys.executable, "-m", "benchmarks.search_quality", *args], tmp_path / "log", stdout)
    try:
        assert benchmark.wait(900) == 0, benchmark.log()[-3000:]
    finally:
        benchmark.kill_everything()
    *searches, last = [json.loads(line) for line in stdout.read_text().strip().splitlines()]
    assert [(run["task"], run["seed"]) for run in searches] == [("tiny", 0), ("tiny", 1)]
    for run in searches:
        assert run["gain_over_baseline"] == pytest.approx(run["best_test_accuracy"] - run["baseline_test_accuracy"])
        assert run["chance_loss"] == pytest.approx(math.log(5)) and run["max_last_eval_loss"] > 0  # BBC: 5 classes
    gains = [run["gain_over_baseline"] for run in searches]
    assert last["tiny"]["min_gain_over_baseline"] == min(gains)
    assert last["tiny"]["diverged_searches"] == sum(r["max_last_eval_loss"] > r["chance_loss"] for r in searches)
    assert last["tiny"]["mean_gain_over_baseline"] == pytest.approx(sum(gains) / 2)
    assert last["tiny"]["mean_best_test_accuracy"] == pytest.approx(sum(r["best_test_accuracy"] for r in searches) / 2)


WAN_SHORT = ["--servers", "2", "--replicas", "2", "--client-hosts", "1", "--clients", "1", "2", "--seconds", "3"]


def wan_namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.startswith(wan_network.PREFIX)}


@pytest.mark.skipif(wan_network.unavailable_reason() is not None, reason=str(wan_network.unavailable_reason()))
def test_wan_swarm_measures_each_round_trip_and_client_count_and_leaves_nothing(tmp_path):
    before = wan_namespaces()
    records = run_benchmark("wan_swarm", [*WAN_SHORT, "--rtt-ms", "0", "40", "--merging", "on"], tmp_path)
    runs = of(records, "wan_swarm")
    assert [(run["rtt_ms"], run["clients"]) for run in runs] == [(0, 1), (0, 2), (40, 1), (40, 2)]
    for run in runs:
        assert run["failed_steps"] == 0, run
        assert_positive(run, "tokens_per_s", "step_s_p50", "step_s_p99")
        assert sum(run["requests_by_server"].values()) >= 2 * run["steps"]  # a forward and a backward a step
        assert 0.5 <= run["replica_split"] <= 1
    for run in runs[2:]:  # a step is two round trips over the one span: its forward and its backward
        assert run["step_s_p50"] >= 0.08, run
    (summary,) = of(records, "wan_swarm_summary")
    assert summary["rtt_ms"] == [0, 40] and summary["failed_steps"] == 0
    assert set(summary["tokens_per_s_by_clients"]) == {"0ms", "40ms"}
    assert wan_namespaces() == before


@pytest.mark.skipif(wan_network.unavailable_reason() is not None, reason=str(wan_network.unavailable_reason()))
def test_wan_swarm_interrupted_removes_its_namespaces_and_processes(tmp_path):
    stdout = tmp_path / "wan.out"
    args = [sys.executable, "-m", "benchmarks.wan_swarm", *WAN_SHORT, "--rtt-ms", "0", "40", "80"]
    benchmark = WatchedProcess(args, tmp_path / "wan.log", stdout)
    try:
        wait_for(benchmark, lambda: '"wan_swarm"' in stdout.read_text(), timeout=300)
        own = {name for name in wan_namespaces() if name.startswith(f"{wan_network.PREFIX}{benchmark.process.pid}-")}
        assert len(own) == 1 + 2 + 1  # the bootstrap peer, the servers, the client host
        benchmark.send(signal.SIGINT)
        assert benchmark.wait(120) != 0
        assert_no_survivors(benchmark)
        assert not own & wan_namespaces()
    finally:
        benchmark.kill_everything()


@pytest.mark.slow
@pytest.mark.skipif(wan_network.unavailable_reason() is not None, reason=str(wan_network.unavailable_reason()))
def test_wan_search_runs_the_tiny_search_against_servers_across_the_simulated_wan(tmp_path):
    before = wan_namespaces()
    overrides = ["budget.num_samples=2", "budget.max_steps=3", "baseline=false", "task.test_size=20"]
    args = ["--rtt-ms", "40", "--concurrent", "2", *(f"--set={override}" for override in overrides)]
    records = run_benchmark("wan_search", args, tmp_path)
    (search,) = of(records, "wan_search")
    assert (search["rtt_ms"], search["concurrent_trials"], search["trials"]) == (40, 2, 2)
    assert_positive(search, "wall_s")
    assert 0 <= search["best_val_accuracy"] <= 1
    (summary,) = of(records, "wan_search_summary")
    assert summary["wall_s"] == {"40ms": {"2": search["wall_s"]}}
    assert wan_namespaces() == before
