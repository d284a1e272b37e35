"""Fixtures and a training loop for the swarm-fault tests: swarms the test controls, searches run as a user
would, clients on the swarm, leak checks.

A test module imports the fixtures it uses (pytest finds fixtures in the module that names them). Every
process a fixture starts is ended in its teardown, also when the test fails; stalled (SIGSTOPped) servers
are continued first, so that they can leave the swarm cleanly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import pytest
import torch

from ptune_search.models.llama.model import DistributedLlamaForSequenceClassification
from ptune_search.pretrained import resolve_model
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.server.settings import ServerSettings
from tests.search.search_process import TINY_CONFIG, SearchProcess
from tests.swarm.swarm_testing import SwarmRegistry, p2pd_children_of_this_process

RECORD_TTL = 3.0  # seconds a server's DHT records live: a dead server leaves routing this soon
FAST_RECORDS = ServerSettings(record_ttl=RECORD_TTL, refresh_period=1.0)


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    """The model of experiments/tiny.yaml (4 blocks, hidden 64), as the search resolves it."""
    return resolve_model("tiny-llama")


@pytest.fixture
def start_swarm(tiny_llama: Path, tmp_path: Path) -> Iterator[Callable[..., LocalSwarm]]:
    """``start_swarm(servers, replicas=1)``: a swarm of ``tiny_llama`` whose records expire after RECORD_TTL."""
    registry = SwarmRegistry()

    def start(servers: int, replicas: int = 1) -> LocalSwarm:
        log_dir = tmp_path / f"swarm{len(registry.swarms)}"
        return registry.start(tiny_llama, servers, replicas, settings=FAST_RECORDS, log_dir=log_dir)

    try:
        yield start
    finally:
        for swarm in registry.swarms:
            for server in swarm.servers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(server.pid, signal.SIGCONT)
        registry.stop_all()


@pytest.fixture
def run_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., SearchProcess]]:
    """``run_search(overrides)``: ``ptune-search search experiments/tiny.yaml`` with output in ``tmp_path/search``.

    Ray's log deduplication is off, so that every line a trial actor prints reaches the driver's log.
    """
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    started: list[SearchProcess] = []

    def start(overrides: Sequence[str]) -> SearchProcess:
        overrides = [f"output_dir={tmp_path / 'search'}", *overrides]
        search = SearchProcess(TINY_CONFIG, overrides, tmp_path / "driver.log")
        started.append(search)
        return search

    try:
        yield start
    finally:
        for search in started:
            search.kill_everything()


@pytest.fixture
def swarm_classifier(tiny_llama: Path) -> Iterator[Callable[..., DistributedLlamaForSequenceClassification]]:
    """``swarm_classifier(initial_peers, **config_overrides)``: a classifier on the swarm, closed after the test."""
    models = []

    def build(initial_peers: Sequence[str], **overrides) -> DistributedLlamaForSequenceClassification:
        model = DistributedLlamaForSequenceClassification.from_pretrained(
            tiny_llama, initial_peers=list(initial_peers), num_labels=3, **overrides
        )
        models.append(model)
        return model

    try:
        yield build
    finally:
        for model in models:
            model.close()
    leftovers = p2pd_children_of_this_process()
    assert not leftovers, f"p2p daemons of closed clients still run: {leftovers}"


def train(
    model: torch.nn.Module, batches: Sequence[dict], steps: int, between: Optional[Callable[[int], None]] = None
) -> tuple[list[float], list[float]]:
    """SGD on the trainable parameters; ``between(step)`` runs between each forward and its backward.

    Returns each step's loss and wall time (forward, backward and update, without ``between``).
    """
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses, seconds = [], []
    for step in range(steps):
        started = time.monotonic()
        output = model(**batches[step % len(batches)])
        forward_seconds = time.monotonic() - started
        if between is not None:
            between(step)
        started = time.monotonic()
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
        seconds.append(forward_seconds + time.monotonic() - started)
    return losses, seconds
