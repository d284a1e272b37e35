"""Fixtures for swarm tests: a tiny model, real swarms of subprocesses on loopback, clients, leak checks.

Every process a test starts is stopped by its fixture, also when the test fails: servers run in their own
process groups and are SIGKILLed as a group if SIGTERM does not end them. After each test no p2p daemon of
this pytest process may remain (clients must be closed), and at the end no process of any started group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
from swarm_testing import HIDDEN, NUM_BLOCKS, SMALL_LIMITS, SwarmRegistry, p2pd_children_of_this_process

from ptune_search.models.llama.model import DistributedLlamaForSequenceClassification
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.server.settings import ServerSettings
from ptune_search.tiny_llama import make_tiny_llama


@pytest.fixture(scope="session")
def swarm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 6-block Llama, hidden 64; its DHT prefix is its folder name, ``tiny-swarm``."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-swarm", hidden_size=HIDDEN, num_layers=NUM_BLOCKS)


@pytest.fixture(scope="session")
def session_swarms() -> Iterator[SwarmRegistry]:
    registry = SwarmRegistry()
    try:
        yield registry
    finally:
        registry.stop_all()


@pytest.fixture(scope="session")
def swarm2(swarm_model: Path, session_swarms: SwarmRegistry, tmp_path_factory) -> LocalSwarm:
    """Two servers (blocks 0:3 and 3:6) with small request limits, shared by the tests that do not break it."""
    return session_swarms.start(swarm_model, 2, settings=SMALL_LIMITS, log_dir=tmp_path_factory.mktemp("swarm2"))


@pytest.fixture(scope="session")
def swarm3(swarm_model: Path, session_swarms: SwarmRegistry, tmp_path_factory) -> LocalSwarm:
    """Three servers: blocks 0:2, 2:4 and 4:6."""
    return session_swarms.start(swarm_model, 3, settings=SMALL_LIMITS, log_dir=tmp_path_factory.mktemp("swarm3"))


@pytest.fixture
def start_swarm(swarm_model: Path, tmp_path: Path) -> Iterator[Callable[..., LocalSwarm]]:
    """Start a swarm of this test only: ``start_swarm(servers, replicas=1, settings=ServerSettings(...))``."""
    registry = SwarmRegistry()

    def start(servers: int, replicas: int = 1, settings: Optional[ServerSettings] = None) -> LocalSwarm:
        log_dir = tmp_path / f"swarm{len(registry.swarms)}"
        return registry.start(swarm_model, servers, replicas, settings=settings, log_dir=log_dir)

    try:
        yield start
    finally:
        registry.stop_all()


@pytest.fixture
def remote_classifier(swarm_model: Path) -> Iterator[Callable[..., DistributedLlamaForSequenceClassification]]:
    """``remote_classifier(swarm, **config_overrides)``: a classifier whose blocks run on ``swarm``; closed after."""
    models = []

    def build(swarm: LocalSwarm, **overrides) -> DistributedLlamaForSequenceClassification:
        settings = dict(num_labels=3, request_timeout=10.0, block_wait_timeout=10.0)
        settings.update(overrides)
        model = DistributedLlamaForSequenceClassification.from_pretrained(
            swarm_model, initial_peers=swarm.initial_peers, **settings
        )
        models.append(model)
        return model

    try:
        yield build
    finally:
        for model in models:
            model.close()


@pytest.fixture(autouse=True)
def no_p2pd_left_by_the_test() -> Iterator[None]:
    yield
    leftovers = p2pd_children_of_this_process()
    assert not leftovers, f"p2p daemons of closed clients still run: {leftovers}"
