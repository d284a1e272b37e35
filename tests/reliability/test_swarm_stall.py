"""A server that stalls (SIGSTOP) is routed around after one request timeout, and banned."""

from __future__ import annotations

import signal

import pytest
from hivemind.p2p import PeerID

from tests.reliability.swarm_fault_testing import start_swarm, swarm_classifier, tiny_llama, train  # noqa: F401 - fixtures
from tests.swarm.swarm_testing import classification_batch, copy_trainable

REQUEST_TIMEOUT = 4.0
STEPS = 10
STALL_AT = 4  # between this step's forward and its backward


@pytest.mark.slow
def test_a_stalled_replica_costs_one_request_timeout_and_is_banned(start_swarm, swarm_classifier):
    swarm = start_swarm(2, replicas=2)  # two servers, each holding every block
    settings = dict(tuning_mode="deep_ptune", pre_seq_len=2, request_timeout=REQUEST_TIMEOUT, ban_timeout=600.0)
    batches = [classification_batch(seed) for seed in range(4)]
    model = swarm_classifier(swarm.initial_peers, **settings)
    reference = swarm_classifier(swarm.initial_peers, **settings)
    copy_trainable(model, reference)
    expected_losses, _ = train(reference, batches, STEPS)

    chain = model.model.layers
    stalled = {}

    def stall_the_server_holding_the_graph(step: int) -> None:
        if step == STALL_AT:  # the coming backward needs the forward graph this server kept
            stalled["peer_id"] = chain.last_route[0][0]
            stalled["child"] = swarm.kill_server(swarm.server_by_peer(stalled["peer_id"]), signal.SIGSTOP)

    losses, seconds = train(model, batches, STEPS, between=stall_the_server_holding_the_graph)

    assert stalled["child"].alive()  # stalled, not dead: only the timeout tells
    assert max(abs(a - b) for a, b in zip(losses, expected_losses)) <= 1e-5
    assert chain.router.is_banned(PeerID.from_base58(stalled["peer_id"]))
    assert chain.passes.stats["failed_calls"] == 1 and chain.passes.stats["rerouted_backward_hops"] == 1
    assert all(peer != stalled["peer_id"] for peer, _, _ in chain.last_route)
    # The stalled step waited out one request timeout (failed_calls above: one, never a second wait on the
    # stalled server), then did its work again on the other replica.
    assert seconds[STALL_AT] >= REQUEST_TIMEOUT, seconds
