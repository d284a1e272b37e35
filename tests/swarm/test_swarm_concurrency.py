"""Many clients share one swarm: their requests are merged into batches on the servers, results do not mix."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from swarm_testing import SMALL_LIMITS, SwarmRegistry, classification_batch

from ptune_search.swarm.protocol import BlockService, unpack_metadata
from ptune_search.swarm.server.fair_queue import MergeLimits

STEPS = 6
MERGE_WAIT = 5.0  # clients in threads of one process meet on the server however loaded the machine (waits end
# as soon as every active client has sent its request, so this costs time only when one is missing)
CLIENTS = [("ptune", 2), ("deep_ptune", 3), ("ptune", 5), ("deep_ptune", 1)]  # different sequence lengths


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in state.items():
            model.get_parameter(name).copy_(value)


def train(model, batches) -> list[float]:
    """STEPS steps of SGD; the last step's grads are left on the parameters."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        if step < STEPS - 1:
            optimizer.step()
        losses.append(loss.item())
    return losses


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def merge_counts(swarm, model) -> list[int]:
    """Each server's count of requests it computed in merged batches (from its info RPC)."""
    connection = model.model.layers.connection

    async def ask(peer_id: str) -> dict[str, Any]:
        stub = BlockService.get_stub(connection.p2p, PeerID.from_base58(peer_id))
        return unpack_metadata((await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=30)).metadata)

    return [connection.run(ask(server.peer_id), timeout=60)["compute"]["merged_requests"] for server in swarm.servers]


@pytest.fixture(scope="module")
def one_server(swarm_model, session_swarms: SwarmRegistry, tmp_path_factory):
    """One server for all 6 blocks, so that every request of every client meets the others there."""
    settings = dataclasses.replace(SMALL_LIMITS, merge=MergeLimits(max_wait=MERGE_WAIT))
    return session_swarms.start(swarm_model, 1, settings=settings, log_dir=tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("clients", [2, 4])
def test_clients_training_at_once_are_merged_on_the_server_and_each_equal_their_run_alone(
    clients, one_server, remote_classifier
):
    torch.manual_seed(0)
    swarm = one_server
    models = [remote_classifier(swarm, tuning_mode=mode, pre_seq_len=length) for mode, length in CLIENTS[:clients]]
    initial = [snapshot(model) for model in models]
    batches = [
        [classification_batch(10 * client + step, length=8 + 3 * client) for step in range(3)]
        for client in range(len(models))
    ]

    alone = [train(model, data) for model, data in zip(models, batches)]
    alone_grads = [grads(model) for model in models]
    merged_before = merge_counts(swarm, models[0])

    for model, state in zip(models, initial):
        restore(model, state)
    together: list = [None] * len(models)
    errors: list[BaseException] = []
    start = threading.Barrier(len(models))

    def run(client: int) -> None:
        try:
            start.wait()
            together[client] = (train(models[client], batches[client]), grads(models[client]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(client,)) for client in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    for client, reference in enumerate(zip(alone, alone_grads)):
        assert together[client] is not None, f"client {client} did not finish"
        losses, last_grads = together[client]
        assert max(abs(a - b) for a, b in zip(losses, reference[0])) <= 1e-5, client
        assert last_grads.keys() == reference[1].keys()
        for name, grad in last_grads.items():  # prompts (shallow and deep) and the head
            assert (grad - reference[1][name]).abs().max().item() <= 1e-5, (client, name)
    merged_after = merge_counts(swarm, models[0])
    assert all(after > before for after, before in zip(merged_after, merged_before)), (merged_before, merged_after)
