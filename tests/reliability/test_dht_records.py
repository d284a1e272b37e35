"""Hostile DHT records next to a real 2-server swarm: refused, ignored with a warning, or found out by banning.

Records are signed (``ptune_search.swarm.signed_records``). A forging full DHT node of the swarm writes under
the block keys of ``tiny-records`` (blocks 0:2 on server A, 2:4 on server B): (a) garbage records, each signed
by a key of its own, (b) its own record with a span that does not contain the block it is stored under,
(c) online records for a peer that serves nothing (the forger itself) and for a peer that does not exist (a
key without a p2p daemon), and (d) records of the real server B claiming blocks 0:4 although it serves 2:4,
unsigned, with a forged signature, or signed by the forger's key, plus a plain value over a block's whole key.
Every honest node refuses (d) with a warning, so the forger cannot overwrite, impersonate or get B banned;
clients skip (a) and (b) with a WARNING, survive (c) by banning the liars and re-routing, and train exactly as
local blocks do.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from ptune_search.models.llama.model import DistributedLlamaForSequenceClassification
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.client.routing import BlockRouter, fetch_block_records
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.protocol import ServerRecord, ServerState, block_uid, block_uids
from ptune_search.swarm.signed_records import PeerKey, owner_peer_id
from ptune_search.tiny_llama import make_tiny_llama
from tests.reliability.forging_peer import ForgingPeer
from tests.swarm.swarm_testing import SMALL_LIMITS, SwarmRegistry, classification_batch, copy_trainable

PREFIX = "tiny-records"
NUM_BLOCKS = 4
STEPS = 8
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


def online(start: int, end: int) -> dict[str, Any]:
    return ServerRecord(ServerState.ONLINE, start, end, throughput=1e6).to_dict()


@pytest.fixture(scope="module")
def records_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / PREFIX, hidden_size=64, num_layers=NUM_BLOCKS)


@pytest.fixture(scope="module")
def swarm(records_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    registry = SwarmRegistry()
    try:
        yield registry.start(records_model, 2, settings=SMALL_LIMITS, log_dir=tmp_path_factory.mktemp("records"))
    finally:
        registry.stop_all()


@pytest.fixture
def forger(swarm: LocalSwarm) -> Iterator[ForgingPeer]:
    """A full DHT node of the swarm that serves no block and forges records."""
    peer = ForgingPeer(swarm.initial_peers)
    try:
        yield peer
    finally:
        peer.close()


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


def honest_logs(swarm: LocalSwarm) -> str:
    return "\n".join(child.log_path.read_text(errors="replace") for child in [swarm.bootstrap, *swarm.servers])


@pytest.mark.slow
def test_forged_records_are_refused_by_every_honest_node_and_cannot_overwrite_or_get_a_server_banned(swarm, forger):
    server_b = swarm.servers[1].peer_id
    (b_subkey,) = [k for k in forger.subkeys(block_uid(PREFIX, 2)) if k.startswith(server_b)]
    forged_subkeys = {
        "it is not signed": server_b,
        "its signature is invalid": b_subkey,
        "but is signed by the key of peer": f"{server_b}[owner:{forger.key.get_public_key().to_bytes().decode()}]",
    }
    for block in (0, 1):
        for subkey in forged_subkeys.values():
            forger.store(block_uid(PREFIX, block), online(0, NUM_BLOCKS), subkey=subkey)
    # expiring after the block's records (as hivemind needs to replace them), within RecordLimits.max_ttl
    forger.store(block_uid(PREFIX, 2), "a plain value over the whole key", subkey=None, ttl=3000)

    logs = honest_logs(swarm)
    for reason, subkey in forged_subkeys.items():
        refusals = re.findall(rf"refusing a DHT record under subkey {re.escape(repr(subkey)[:120])}: (.*)", logs)
        assert refusals and all(reason in line for line in refusals), f"record {subkey!r} not refused: {refusals}"
    assert "refusing a DHT record under subkey None" in logs, "the plain value over a block key was not refused"
    with SwarmConnection(swarm.initial_peers) as client:
        records = client.run(fetch_block_records(client.node, block_uids(PREFIX, 0, NUM_BLOCKS)), timeout=60)
    served = [{(peer.to_base58(), r.start, r.end) for peer, r in servers.items()} for servers in records]
    server_a = swarm.servers[0].peer_id
    assert served == [{(server_a, 0, 2)}] * 2 + [{(server_b, 2, 4)}] * 2, served


@pytest.mark.slow
def test_lying_and_garbage_records_are_ignored_or_banned_and_training_equals_local_blocks(
    records_model, swarm, forger, caplog
):
    server_b = swarm.servers[1].peer_id
    garbage_keys = [PeerKey() for _ in GARBAGE_RECORDS]
    nowhere, forger_peer = PeerKey(), forger.key.peer_id.to_base58()
    half = len(GARBAGE_RECORDS) // 2  # one peer relays at most RecordLimits.max_relayed_per_key records per key
    for block in range(NUM_BLOCKS):
        uid = block_uid(PREFIX, block)
        garbage = list(zip(garbage_keys, GARBAGE_RECORDS))
        for key, value in garbage[:half] if block < 2 else garbage[half:]:  # (a)
            assert forger.store(uid, value, subkey=key.subkey, signer=key)
        assert forger.store(uid, online(0, NUM_BLOCKS), subkey=forger.key.subkey)  # (c) a peer that serves nothing
        assert forger.store(uid, online(0, NUM_BLOCKS), subkey=nowhere.subkey, signer=nowhere)  # (c) no such peer
    for block in (2, 3):
        # (b) a span that does not contain the block (the forger's own record: it cannot write A's)
        assert forger.store(block_uid(PREFIX, block), online(0, 2), subkey=forger.key.subkey)
    for block in (0, 1):  # (d) B claims blocks it does not serve: refused (see the test above)
        forger.store(block_uid(PREFIX, block), online(0, NUM_BLOCKS), subkey=server_b)

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
        remote.close()
    local_losses = train(local, batches)

    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "ptune_search.swarm.client.routing" and r.levelno == logging.WARNING
    ]
    for key in garbage_keys:
        shown = repr(key.subkey)[:80]
        assert any(shown in message for message in warnings), f"no warning about the record of {shown}"
    for block in (2, 3):
        assert any(
            f"{repr(forger.key.subkey)[:80]} under {block_uid(PREFIX, block)}: its span 0:2 does not contain "
            f"block {block}" in m
            for m in warnings
        ), f"no warning about the lying span under block {block}"
    banned = {match for r in caplog.records for match in re.findall(r"banning server (\w+)", r.getMessage())}
    assert stats["failed_calls"] >= 1 and banned, "no lying record was ever tried"
    assert banned <= {forger_peer, nowhere.peer_id.to_base58()}, f"an honest server was banned: {banned}"
    assert owner_peer_id(forger.key.subkey).to_base58() == forger_peer
    print(f"lying peers tried and banned: {sorted(banned)}; failed calls {stats['failed_calls']}")
    assert max(abs(a - b) for a, b in zip(remote_losses, local_losses)) <= 1e-5, (remote_losses, local_losses)


@pytest.mark.slow
def test_with_trusted_servers_a_client_routes_only_to_them(swarm, forger, caplog):
    server_a, server_b = (child.peer_id for child in swarm.servers)
    for block in range(NUM_BLOCKS):
        assert forger.store(block_uid(PREFIX, block), online(0, NUM_BLOCKS), subkey=forger.key.subkey)
    caplog.set_level(logging.WARNING, logger="ptune_search.swarm.client.routing")
    with SwarmConnection(swarm.initial_peers) as client:
        routed = {}
        for trusted in (None, [server_a, server_b]):
            router = BlockRouter(client.node, PREFIX, NUM_BLOCKS, ClientConfig(trusted_servers=trusted))
            client.run(router.refresh(), timeout=60)
            routed[trusted is None] = [{p.to_base58() for p in router.servers_for(b)} for b in range(NUM_BLOCKS)]
    forger_peer = forger.key.peer_id.to_base58()
    honest = [{server_a}] * 2 + [{server_b}] * 2
    assert all(found >= {peer, forger_peer} for found, (peer,) in zip(routed[True], honest)), routed[True]
    assert routed[False] == honest
    assert any(f"peer {forger_peer} is not in trusted_servers" in r.getMessage() for r in caplog.records)
