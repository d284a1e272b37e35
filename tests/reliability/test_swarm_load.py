"""Load (issue 7, item 3): 8 prompt-tuning clients train at once against a 2-server loopback swarm.

The shape of ``benchmarks/swarm_load.py`` (which runs it for 10 minutes), here for 30 s: 8 client
processes, 4 ``ptune`` and 4 ``deep_ptune``, on a generated Llama of 8 blocks of hidden 128 split over two
servers. One load run is shared by the tests below, each checking one property of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from benchmarks.load_harness import LoadReport, LoadShape, make_load_model, run_load
from ptune_search.swarm.launcher import LocalSwarm
from tests.swarm.swarm_testing import SwarmRegistry

CLIENTS = 8
DURATION_S = 30.0
FAIRNESS_BOUND = 2.0  # max/min of per-client tokens/s; the servers' FairQueue serves clients round-robin
RSS_GROWTH_BOUND_MIB = 64.0  # rise of the RSS level per server process and per p2p daemon, after the settled start

pytestmark = pytest.mark.slow


def processes_in_groups(groups: set[int]) -> list[str]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) in groups and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid}: {' '.join(process.cmdline())[:120]}")
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def run_and_reap(model: Path, swarm: LocalSwarm, shape: LoadShape, work_dir: Path) -> tuple[LoadReport, list[str]]:
    """Run the load; also return the processes of its clients that survived it (killed here, to be none)."""
    report = run_load(model, swarm, shape, work_dir=work_dir)
    survivors = processes_in_groups({report.client_session})
    for line in survivors:  # never leave them running, even when the test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
    return report, survivors


@pytest.fixture(scope="module")
def load_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, LocalSwarm]]:
    """The generated load model (8 blocks of hidden 128) and a swarm of two servers of 4 blocks each."""
    folder = tmp_path_factory.mktemp("swarm-load")
    model = make_load_model(folder)
    registry = SwarmRegistry()
    try:
        yield model, registry.start(model, 2, log_dir=folder / "swarm")
    finally:
        registry.stop_all()


@pytest.fixture(scope="module")
def load(load_swarm, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadReport, list[str]]:
    """One load run of 8 clients for 30 s, shared by the tests that check its properties."""
    model, swarm = load_swarm
    shape = LoadShape(clients=CLIENTS, duration_s=DURATION_S)
    report, survivors = run_and_reap(model, swarm, shape, tmp_path_factory.mktemp("load-clients"))
    print(json.dumps(report.summary()))  # the measured figures, for the log (pytest -s)
    return report, survivors


def test_no_swarm_call_fails_and_no_client_raises(load):
    report, _ = load
    summary = report.summary()
    assert summary["failed_calls"] == 0, summary
    assert summary["client_exceptions"] == 0, [client.errors for client in report.clients if client.errors]


def test_every_client_makes_progress(load):
    report, _ = load
    assert len(report.clients) == CLIENTS
    assert all(client.steps > 0 for client in report.clients), report.client_records()
    assert {client.tuning_mode for client in report.clients} == {"ptune", "deep_ptune"}


def test_clients_share_the_servers_fairly(load):
    report, _ = load
    assert report.fairness <= FAIRNESS_BOUND, report.client_records()


def test_server_memory_stays_flat(load):
    """The RSS level from 10 s into the load (LoadShape.settle_s: every client has had requests in flight) to its
    end (``MemoryTrace.growth_since``): memory the load keeps taking, not the batch in flight at one sample."""
    report, _ = load
    growth = report.server_growth_mib()
    assert sum(not name.endswith("/p2pd") for name in growth) == 2, growth
    assert all(len(trace.samples) >= DURATION_S / 2 for trace in report.memory), "RSS was not sampled over the load"
    assert max(growth.values()) < RSS_GROWTH_BOUND_MIB, report.server_records()


def test_servers_keep_no_activations_after_the_load(load):
    """Every kept forward graph was consumed by its backward: the activation cache ends empty."""
    report, _ = load
    caches = {record["server"]: record["cache_at_end"] for record in report.server_records()}
    assert len(caches) == 2 and all(cache["bytes"] == 0 for cache in caches.values()), caches


def test_no_client_process_outlives_the_load(load):
    _, survivors = load
    assert not survivors


def test_a_failing_client_is_counted_and_reported(load_swarm, tmp_path):
    """Clients fail loudly: an exception in a client reaches the report with its message, and nothing survives."""
    _, swarm = load_swarm
    shape = LoadShape(clients=2, duration_s=1.0)
    report, survivors = run_and_reap(tmp_path / "no-such-model", swarm, shape, tmp_path / "clients")
    assert report.client_exceptions == 2 and report.summary()["clients_without_progress"] == 2
    assert all("no-such-model" in client.errors[0] for client in report.clients), [c.errors for c in report.clients]
    assert report.fairness == float("inf")
    assert not survivors
