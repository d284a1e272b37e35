"""A server's life as clients see it: blocks missing, a server joining, a server leaving."""

from __future__ import annotations

import time

import pytest
import torch
from swarm_testing import HIDDEN, NUM_BLOCKS, SwarmRegistry, swarm_config

from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.client.remote_chain import RemoteBlockChain
from ptune_search.swarm.client.routing import MissingBlockError, fetch_block_records
from ptune_search.swarm.protocol import ServerState, block_uids

BLOCK_WAIT = 3.0


@pytest.fixture(scope="module")
def half_swarm(swarm_model, tmp_path_factory):
    """A swarm whose only permanent server holds blocks 0..2 of 6; tests stop the servers they add."""
    registry = SwarmRegistry()
    try:
        swarm = registry.start(swarm_model, 0, log_dir=tmp_path_factory.mktemp("half-swarm"))
        swarm.start_server(0, 3)
        swarm.wait_until_online(blocks=(0, 3))
        yield swarm
    finally:
        registry.stop_all()


def one_token_batch():
    return torch.randn(1, 4, HIDDEN), torch.ones(1, 4, dtype=torch.long)


def test_missing_block_is_a_clear_error_within_the_bounded_wait(half_swarm, swarm_model):
    chain = RemoteBlockChain.connect(swarm_config(swarm_model, half_swarm, block_wait_timeout=BLOCK_WAIT))
    try:
        started = time.monotonic()
        with pytest.raises(
            MissingBlockError, match=r"no server is online for block tiny-swarm\.3 \(block 3\)"
        ) as error:
            chain(*one_token_batch())
        # the client waited for the block as long as it was told, then gave up with the reason
        assert BLOCK_WAIT <= error.value.waited <= time.monotonic() - started and not error.value.joining
    finally:
        chain.close()


def test_a_server_joining_while_the_client_waits_completes_the_chain(half_swarm, swarm_model):
    chain = RemoteBlockChain.connect(swarm_config(swarm_model, half_swarm, block_wait_timeout=120.0))
    joining = len(half_swarm.servers)
    try:
        half_swarm.start_server(3, NUM_BLOCKS)
        output = chain(*one_token_batch())
        assert output.shape == (1, 4, HIDDEN)
        assert [(start, end) for _, start, end in chain.last_route] == [(0, 3), (3, NUM_BLOCKS)]
    finally:
        chain.close()
        half_swarm.stop_server(joining)


def test_a_stopped_server_announces_offline_at_once(half_swarm):
    index = len(half_swarm.servers)
    server = half_swarm.start_server(3, NUM_BLOCKS, extra_args=["--record-ttl", "60"])
    uids = block_uids(half_swarm.prefix, 3, NUM_BLOCKS)
    with SwarmConnection(half_swarm.initial_peers) as connection:

        def states() -> set[ServerState]:
            found = connection.run(fetch_block_records(connection.node, uids), timeout=30)
            return {servers[peer].state for servers in found for peer in servers if peer.to_base58() == server.peer_id}

        half_swarm.wait_until_online(blocks=(3, NUM_BLOCKS))
        assert states() == {ServerState.ONLINE}
        assert half_swarm.stop_server(index) == 0
        assert states() == {ServerState.OFFLINE}  # long before the records' 60 s expiry
