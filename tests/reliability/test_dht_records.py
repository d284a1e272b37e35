"""Hostile DHT records next to a real 2-server swarm: ignored with a warning, or found out by banning.

A rogue DHT peer writes under the block keys of ``tiny-records`` (blocks 0:2 on server A, 2:4 on server B):
(a) garbage records, (b) a record whose span does not contain the block it is stored under, (c) online
records for a peer that serves nothing (the rogue itself) and for a peer that does not exist, and (d) a
record of the real server B claiming blocks 0:4 although it serves 2:4. Clients skip (a) and (b) with a
WARNING, survive (c) and (d) by banning the liars and re-routing, and train exactly as local blocks do.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from ptune_search.models.llama.model import DistributedLlamaForSequenceClassification
from ptune_search.models.tiny_llama import make_tiny_llama
from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.protocol import ServerRecord, ServerState, block_uid
from tests.swarm.swarm_testing import LIMIT_ARGS, SwarmRegistry, classification_batch, copy_trainable

PREFIX = "tiny-records"
NUM_BLOCKS = 4
STEPS = 8
ROGUE_TTL = 600.0
GARBAGE_RECORDS: list[Any] = [
    "not a record",
    12345,
    [1, 2, 3],
    b"\x00\xff\x13random bytes",
    {"state": "online", "start": "0", "end": 4},
    {"state": "online", "start": 0, "end": 2**63},
    {"state": "online", "start": -(2**63), "end": 4},
    {"state": "online", "start": 0, "end": 4, "throughput": float("nan")},
    {"state": "online", "start": 0, "end": 4, "dtype": "int64"},
    {"state": "online", "start": True, "end": 4},
    {"state": 7, "start": 0, "end": 4},
]


def fake_peer_id() -> PeerID:
    """The id of a peer that exists nowhere (an identity multihash of random bytes)."""
    return PeerID(bytes([0x00, 0x24]) + os.urandom(36))


def online(start: int, end: int) -> dict[str, Any]:
    return ServerRecord(ServerState.ONLINE, start, end, throughput=1e6).to_dict()


@pytest.fixture(scope="module")
def records_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / PREFIX, hidden_size=64, num_layers=NUM_BLOCKS)


@pytest.fixture(scope="module")
def swarm(records_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    registry = SwarmRegistry()
    try:
        yield registry.start(records_model, 2, server_args=LIMIT_ARGS, log_dir=tmp_path_factory.mktemp("records"))
    finally:
        registry.stop_all()


@pytest.fixture
def rogue(swarm: LocalSwarm) -> Iterator[SwarmConnection]:
    """A DHT peer of the swarm that serves no block."""
    connection = SwarmConnection(swarm.initial_peers)
    try:
        yield connection
    finally:
        connection.close()


def store(rogue: SwarmConnection, block: int, subkey: Any, value: Any) -> None:
    stored = rogue.run(
        rogue.node.store(block_uid(PREFIX, block), value, get_dht_time() + ROGUE_TTL, subkey=subkey), timeout=60
    )
    assert stored, f"the rogue could not store {value!r} under block {block}"


def train(model, batches) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(STEPS):
        output = model(**batches[step % len(batches)])
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    return losses


@pytest.mark.slow
def test_lying_and_garbage_records_are_ignored_or_banned_and_training_equals_local_blocks(
    records_model, swarm, rogue, caplog
):
    server_a, server_b = (child.peer_id for child in swarm.servers)
    garbage_peers = [fake_peer_id().to_base58() for _ in GARBAGE_RECORDS]
    nowhere, rogue_peer = fake_peer_id().to_base58(), rogue.node.peer_id.to_base58()
    for block in range(NUM_BLOCKS):
        for subkey, value in zip(garbage_peers, GARBAGE_RECORDS):  # (a)
            store(rogue, block, subkey, value)
        store(rogue, block, "not a peer id", online(0, NUM_BLOCKS))  # (a) a subkey that names no peer
        store(rogue, block, rogue_peer, online(0, NUM_BLOCKS))  # (c) a peer that serves nothing
        store(rogue, block, nowhere, online(0, NUM_BLOCKS))  # (c) a peer that does not exist
    for block in (2, 3):
        store(rogue, block, server_a, online(0, 2))  # (b) A's true span, under blocks it does not contain
    for block in (0, 1):
        store(rogue, block, server_b, online(0, NUM_BLOCKS))  # (d) B claims blocks it does not serve

    settings = dict(num_labels=3, tuning_mode="deep_ptune", pre_seq_len=2)
    local = DistributedLlamaForSequenceClassification.from_pretrained(records_model, local_blocks=True, **settings)
    torch.nn.init.normal_(local.model.intermediate_prompt_embeddings.weight, std=0.5)
    batches = [classification_batch(seed, vocab=local.config.vocab_size) for seed in range(4)]
    caplog.set_level(logging.INFO, logger="ptune_search.swarm")
    remote = DistributedLlamaForSequenceClassification.from_pretrained(
        records_model, initial_peers=swarm.initial_peers, request_timeout=30.0, ban_timeout=120.0, **settings
    )
    try:
        copy_trainable(local, remote)
        remote_losses = train(remote, batches)
        stats = remote.model.layers.passes.stats
    finally:
        remote.model.layers.close()
    local_losses = train(local, batches)

    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "ptune_search.swarm.client.routing" and r.levelno == logging.WARNING
    ]
    for subkey in [*garbage_peers, "not a peer id"]:
        assert any(repr(subkey)[:80] in message for message in warnings), f"no warning about the record of {subkey}"
    for block in (2, 3):
        assert any(
            f"'{server_a}' under {block_uid(PREFIX, block)}: its span 0:2 does not contain block {block}" in m
            for m in warnings
        ), f"no warning about the lying span under block {block}"
    banned = {match for r in caplog.records for match in re.findall(r"banning server (\w+)", r.getMessage())}
    assert stats["failed_calls"] >= 1 and banned, "no lying record was ever tried"
    assert banned <= {rogue_peer, nowhere, server_b}, f"an honest server was banned: {banned}"
    print(f"lying peers tried and banned: {sorted(banned)}; failed calls {stats['failed_calls']}")
    assert max(abs(a - b) for a, b in zip(remote_losses, local_losses)) <= 1e-5, (remote_losses, local_losses)
