"""Replicas keep training alive when a server dies, and dead servers leave the DHT."""

from __future__ import annotations

import logging
import math
import re
import signal
import time

import torch
from swarm_testing import NUM_BLOCKS, classification_batch

from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.client.routing import fetch_block_records
from ptune_search.swarm.protocol import ServerState, block_uids
from ptune_search.swarm.server.settings import ServerSettings

RECORD_TTL = 3.0
FAST_RECORDS = ServerSettings(record_ttl=RECORD_TTL, refresh_period=1.0)
STEPS = 30


def train(model, batches, kill_at=None, on_kill=None) -> list[float]:
    """SGD on the prompts and head; at step ``kill_at`` call ``on_kill`` between forward and backward."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(STEPS):
        output = model(**batches[step % len(batches)])
        if step == kill_at:
            on_kill()
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    return losses


def records_of(connection: SwarmConnection, swarm, peer_id: str) -> dict[str, ServerState]:
    """The states this peer has announced for the swarm's blocks, as still found in the DHT."""
    uids = block_uids(swarm.prefix, 0, NUM_BLOCKS)
    found = connection.run(fetch_block_records(connection.node, uids), timeout=30)
    return {
        uid: servers[peer].state for uid, servers in zip(uids, found) for peer in servers if peer.to_base58() == peer_id
    }


def test_training_survives_sigkill_of_a_replica_and_its_records_expire(start_swarm, remote_classifier, swarm_model):
    swarm = start_swarm(4, replicas=2, settings=FAST_RECORDS)
    settings = dict(tuning_mode="deep_ptune", pre_seq_len=2, ban_timeout=60.0, request_timeout=10.0)
    batches = [classification_batch(seed) for seed in range(5)]

    torch.manual_seed(0)
    baseline_model = remote_classifier(swarm, **settings)
    initial = {name: p.detach().clone() for name, p in baseline_model.named_parameters() if p.requires_grad}
    baseline = train(baseline_model, batches)

    model = remote_classifier(swarm, **settings)
    with torch.no_grad():
        for name, value in initial.items():
            model.get_parameter(name).copy_(value)
    victim = {}

    def kill_first_server_of_the_route():
        peer_id = model.model.layers.last_route[0][0]  # its forward graph is needed by the coming backward
        victim["peer_id"] = peer_id
        victim["child"] = swarm.kill_server(swarm.server_by_peer(peer_id), signal.SIGKILL)

    losses = train(model, batches, kill_at=STEPS // 2, on_kill=kill_first_server_of_the_route)

    assert victim["child"].process.wait(10) == -signal.SIGKILL
    assert model.model.layers.passes.stats["rerouted_backward_hops"] == 1
    assert all(math.isfinite(loss) for loss in losses)
    assert max(abs(a - b) for a, b in zip(losses, baseline)) <= 1e-5
    assert victim["peer_id"] not in [peer for peer, _, _ in model.model.layers.last_route]

    with SwarmConnection(swarm.initial_peers) as connection:
        deadline = time.monotonic() + 40 * RECORD_TTL  # they expire after RECORD_TTL; this only guards a hang
        while records_of(connection, swarm, victim["peer_id"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert records_of(connection, swarm, victim["peer_id"]) == {}


def test_forward_reroutes_around_a_dead_replica(start_swarm, remote_classifier):
    swarm = start_swarm(2, replicas=2, settings=FAST_RECORDS)  # two servers, each holding every block
    model = remote_classifier(swarm, tuning_mode="ptune", pre_seq_len=2, ban_timeout=60.0, request_timeout=10.0)
    batch = classification_batch(0)
    chain = model.model.layers
    with torch.no_grad():
        expected = model(**batch).logits
        used = chain.last_route[0][0]
        swarm.kill_server(swarm.server_by_peer(used), signal.SIGKILL)
        for _ in range(30):  # routes are random among replicas: go on until a forward has tried the dead one
            assert torch.allclose(model(**batch).logits, expected, atol=1e-6)
            assert chain.last_route[0][0] != used
            if chain.passes.stats["failed_calls"]:
                break
    assert chain.passes.stats["failed_calls"] == 1  # then banned: never tried again


def test_dead_servers_leave_routing_at_once_though_their_records_live_on(start_swarm, remote_classifier, caplog):
    swarm = start_swarm(3, replicas=3)  # every server holds every block; records live 60 s
    ban_timeout = 0.2  # a ban ends long before the dead servers' records expire
    model = remote_classifier(swarm, tuning_mode="ptune", pre_seq_len=2, ban_timeout=ban_timeout)
    batch = classification_batch(0)
    chain = model.model.layers
    caplog.set_level(logging.INFO, logger="ptune_search.swarm.client.routing")
    with torch.no_grad():
        expected = model(**batch).logits  # the client has read the records of all three servers
        stopped, killed = swarm.servers[0].peer_id, swarm.servers[1].peer_id
        swarm.stop_server(0)
        with SwarmConnection(swarm.initial_peers) as connection:  # a clean stop leaves offline records at once
            assert set(records_of(connection, swarm, stopped).values()) == {ServerState.OFFLINE}
        swarm.kill_server(1, signal.SIGKILL).process.wait(10)
        deadline = None
        for _ in range(300):
            assert torch.allclose(model(**batch).logits, expected, atol=1e-6)
            events = [m.groups() for r in caplog.records if (m := re.match(r"(banning )?server (\w+)", r.getMessage()))]
            unreachable = [peer for ban, peer in events if not ban]
            if deadline is None and killed in unreachable:
                deadline = time.monotonic() + 16 * ban_timeout  # longer than the longest ban (8x)
            if deadline is not None and time.monotonic() > deadline:
                break
    assert killed in unreachable, "the killed server was never found unreachable"
    assert set(peer for _, peer in events) <= {stopped, killed}, events
    for peer in set(unreachable):  # a refused dial is its last failure: the peer is never tried again
        assert unreachable.count(peer) == 1 and ("banning ", peer) not in events[events.index((None, peer)) :], events
    assert chain.passes.stats["failed_calls"] == sum(1 for ban, _ in events if ban)
