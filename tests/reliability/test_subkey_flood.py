"""A subkey flood: thousands of records under the block keys, each signed by a fresh key, so all verify.

A forging full DHT node (``forging_peer``) stores FLOOD_KEYS records under each of the 4 block keys of a real
2-server swarm straight at every honest node (bootstrap and servers, real processes on loopback), and keeps
them all in its own storage, so it hands them all out when asked. Each record is a plausible ``online``
record of a peer that does not exist, claiming every block. Within the bounds of ``record_bounds``:

- each honest node stores at most ``max_relayed_per_key`` of them per key, and its resident memory grows by
  less than FLOOD_RSS_BOUND (the node's records are bounded by ``RecordLimits.memory_bound()`` in any case);
- a client refuses the forger's whole answer (more records than an honest node may hold), still reads every
  server's record, routes to the honest servers and trains exactly as local blocks do.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hivemind.p2p import PeerID

from ptune_search.models.llama.model import DistributedLlamaForSequenceClassification
from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.client.routing import fetch_block_records
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.protocol import ServerRecord, ServerState, block_uid, block_uids
from ptune_search.swarm.record_bounds import RecordLimits
from ptune_search.tiny_llama import make_tiny_llama
from tests.reliability.forging_peer import ForgingPeer, cheap_keys
from tests.swarm.swarm_testing import SMALL_LIMITS, SwarmRegistry, classification_batch, copy_trainable

PREFIX = "tiny-flood"
NUM_BLOCKS = 4
FLOOD_KEYS = 1500  # records per block key, each with a key of its own: 6000 in all, offered to every node
FLOOD_RSS_BOUND = 16 * 1024**2  # bytes an honest node's resident memory may grow by under the flood
LIMITS = RecordLimits()  # what every node of the swarm runs with
STEPS = 3


@pytest.fixture(scope="module")
def flood_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / PREFIX, hidden_size=64, num_layers=NUM_BLOCKS)


@pytest.fixture(scope="module")
def swarm(flood_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    registry = SwarmRegistry()
    try:
        yield registry.start(flood_model, 2, settings=SMALL_LIMITS, log_dir=tmp_path_factory.mktemp("flood"))
    finally:
        registry.stop_all()


@pytest.fixture(scope="module")
def flood(swarm: LocalSwarm) -> Iterator[dict[str, tuple[int, int]]]:
    """Flood every honest node; per node (by peer id): (records it accepted, growth of its RSS in bytes)."""
    keys = cheap_keys(FLOOD_KEYS * NUM_BLOCKS)
    lie = ServerRecord(ServerState.ONLINE, 0, NUM_BLOCKS, throughput=1e9).to_dict()
    records = [(block_uid(PREFIX, i // FLOOD_KEYS), key, lie) for i, key in enumerate(keys)]
    honest = {swarm.initial_peers[0].rsplit("/p2p/", 1)[1]: swarm.bootstrap.pid}
    honest.update({child.peer_id: child.pid for child in swarm.servers})
    forger = ForgingPeer(swarm.initial_peers)
    try:
        found = {}
        for peer_id, pid in honest.items():
            before = resident_bytes(pid)
            started = time.monotonic()
            accepted = forger.flood(PeerID.from_base58(peer_id), records)
            found[peer_id] = (accepted, resident_bytes(pid) - before)
            print(
                f"node {peer_id[-6:]}: {accepted} of {len(records)} records accepted in "
                f"{time.monotonic() - started:.1f}s, RSS {before / 2**20:.1f} MiB +{found[peer_id][1] / 2**20:.2f} MiB"
            )
        yield found
    finally:
        forger.close()


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.mark.slow
def test_under_a_subkey_flood_every_node_stores_a_few_records_per_key_and_its_memory_stays_bounded(flood):
    for peer_id, (accepted, growth) in flood.items():
        assert accepted <= LIMITS.max_relayed_per_key * NUM_BLOCKS, (peer_id, accepted)
        assert growth <= FLOOD_RSS_BOUND, f"node {peer_id} grew by {growth / 2**20:.1f} MiB under the flood"
    assert LIMITS.memory_bound() <= 64 * 1024**2


@pytest.mark.slow
def test_under_a_subkey_flood_honest_records_stay_readable_and_a_client_trains_through_the_honest_servers(
    flood_model, swarm, flood
):
    server_a, server_b = (child.peer_id for child in swarm.servers)
    with SwarmConnection(swarm.initial_peers) as client:
        records = client.run(fetch_block_records(client.node, block_uids(PREFIX, 0, NUM_BLOCKS)), timeout=120)
    read = [{peer.to_base58() for peer in servers} for servers in records]
    print(f"records read per block: {[len(peers) for peers in read]}")
    for block, peers in enumerate(read):
        assert (server_a if block < 2 else server_b) in peers, f"the server of block {block} is not read: {peers}"
        assert len(peers) <= 1 + LIMITS.max_relayed_per_key * 3, f"block {block}: {len(peers)} records read"

    settings = dict(num_labels=3, tuning_mode="deep_ptune", pre_seq_len=2)
    local = DistributedLlamaForSequenceClassification.from_pretrained(flood_model, local_blocks=True, **settings)
    remote = DistributedLlamaForSequenceClassification.from_pretrained(
        flood_model, initial_peers=swarm.initial_peers, request_timeout=30.0, **settings
    )
    batches = [classification_batch(seed, vocab=local.config.vocab_size) for seed in range(STEPS)]
    try:
        copy_trainable(local, remote)
        losses = {name: train(model, batches) for name, model in (("remote", remote), ("local", local))}
        chain = remote.model.layers
        route, stats = chain.last_route, chain.passes.stats
    finally:
        remote.close()
    print(f"route {route}, stats {stats}")
    assert {peer for peer, _, _ in route} <= {server_a, server_b}, route
    assert max(abs(a - b) for a, b in zip(losses["remote"], losses["local"])) <= 1e-5, losses


def train(model, batches) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for batch in batches:
        output = model(**batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    return losses
