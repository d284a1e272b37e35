"""A live block server under hostile input: thousands of random and mutated requests through hivemind.

The server runs in its own process and serves all 4 blocks of a tiny Llama (hidden 64) with the limits of
tests/swarm (512 tokens, 3 MiB per request), a 4 s receive timeout for streamed requests and a 16 MiB
activation cache. Every input must be refused with an error, or answered as local blocks would, within a
deadline. Afterwards the server is alive, answers ``info`` with an empty queue and no stream left
open, serves a good client exactly, and its RSS never grew beyond its payload limit plus a margin.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from fuzz_oracle import LocalBlocks, check_outcome
from fuzz_requests import HIDDEN, NUM_BLOCKS, PREFIX, Expect, FuzzCase, fuzz_cases
from fuzz_sending import END_OF_STREAM, FuzzClient, frame, read_responses
from fuzz_watch import PeakRss, server_info, wait_for_idle
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, Phase, given, settings

from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.protocol import ErrorKind, pack_metadata, span_uid
from ptune_search.swarm.wire import serialize_tensor, split_tensor
from ptune_search.tiny_llama import make_tiny_llama
from tests.swarm.swarm_testing import (
    MAX_PAYLOAD,
    SMALL_LIMITS,
    SwarmRegistry,
    chain_vs_local_blocks,
    p2pd_children_of_this_process,
    swarm_config,
)

RECEIVE_TIMEOUT = 4.0
CACHE_BYTES = 16 * 1024 * 1024
FUZZED_SERVER = dataclasses.replace(
    SMALL_LIMITS,
    limits=dataclasses.replace(SMALL_LIMITS.limits, receive_timeout=RECEIVE_TIMEOUT),
    cache_bytes=CACHE_BYTES,
)
MIN_INPUTS = 2000
REQUEST_DEADLINE = 120.0  # per input: tells a hung server from a slow one on a loaded machine
RSS_MARGIN = 32 * 1024 * 1024  # allocator slack, activations of the largest request, protobuf copies


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / PREFIX, hidden_size=HIDDEN, num_layers=NUM_BLOCKS)


@pytest.fixture(scope="module")
def fuzzed_swarm(fuzz_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    registry = SwarmRegistry()
    try:
        yield registry.start(fuzz_model, 1, settings=FUZZED_SERVER, log_dir=tmp_path_factory.mktemp("fuzzed"))
    finally:
        registry.stop_all()


@pytest.fixture(scope="module")
def client(fuzzed_swarm: LocalSwarm) -> Iterator[FuzzClient]:
    connection = SwarmConnection(fuzzed_swarm.initial_peers)
    try:
        yield FuzzClient(connection, PeerID.from_base58(fuzzed_swarm.servers[0].peer_id))
    finally:
        connection.close()
        assert not p2pd_children_of_this_process(), "the fuzzing client's p2p daemon survived"


@pytest.fixture(scope="module")
def local_blocks(fuzz_model: Path) -> LocalBlocks:
    return LocalBlocks(fuzz_model)


def assert_server_healthy(swarm: LocalSwarm, client: FuzzClient, rss: PeakRss) -> None:
    assert swarm.servers[0].alive(), f"the server died:\n{swarm.servers[0].log_tail()}"
    info = wait_for_idle(client.connection, client.peer_id, timeout=RECEIVE_TIMEOUT + 10)
    assert info["queue"] == 0, f"requests are stuck in the server's queue: {info}"
    assert info["receiving_streams"] == 0, f"request streams are still held open: {info}"
    bound = MAX_PAYLOAD + CACHE_BYTES + RSS_MARGIN
    assert rss.growth <= bound, f"the server's RSS grew by {rss.growth / 2**20:.1f} MiB (bound {bound / 2**20:.0f} MiB)"


def assert_good_client_equals_local_blocks(model: Path, swarm: LocalSwarm) -> None:
    """Forward and backward of a real client through the fuzzed server equal local blocks (fp32, 1e-5)."""
    config = swarm_config(model, swarm, request_timeout=30.0)
    assert max(chain_vs_local_blocks(model, config, batch=2, seed=7)) <= 1e-5


def warm_up(client: FuzzClient) -> None:
    """Valid requests of the largest size first, so that the RSS baseline includes the allocator's pools."""
    for method in ("forward", "backward"):
        for streamed in (False, True):
            hidden = torch.randn(1, 512, HIDDEN)
            tensors = [hidden, torch.ones(1, 512, dtype=torch.long)] + ([hidden] if method == "backward" else [])
            request = runtime_pb2.ExpertRequest(
                uid=span_uid(PREFIX, 0, NUM_BLOCKS),
                tensors=[serialize_tensor(t) for t in tensors],
                metadata=pack_metadata({"request_id": "warm-up", "keep": method == "forward"}),
            )
            case = FuzzCase("warm-up", method, streamed, [request.SerializeToString()], Expect.ANY)
            outcome = client.send(case, REQUEST_DEADLINE)
            assert outcome.tensors, outcome.describe()


@pytest.mark.slow
def test_thousands_of_hostile_requests_are_refused_or_answered_exactly_and_the_server_stays_healthy(
    fuzz_model, fuzzed_swarm, client, local_blocks
):
    warm_up(client)
    tried: collections.Counter[str] = collections.Counter()
    slowest = [0.0]

    @settings(
        max_examples=MIN_INPUTS,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=fuzz_cases())
    def send_one(case):
        outcome = client.send(case, REQUEST_DEADLINE)
        tried[case.label] += 1
        slowest[0] = max(slowest[0], outcome.seconds)
        check_outcome(case, outcome, local_blocks)

    started = time.monotonic()
    with PeakRss(fuzzed_swarm.servers[0].pid) as rss:
        send_one()
        total = sum(tried.values())
        print(
            f"fuzzed the server with {total} inputs in {time.monotonic() - started:.0f}s (slowest answer "
            f"{slowest[0]:.2f}s, RSS {rss.start / 2**20:.0f} MiB + peak growth {rss.growth / 2**20:.1f} MiB): "
            f"{dict(sorted(tried.items()))}"
        )
        assert total >= MIN_INPUTS
        assert_server_healthy(fuzzed_swarm, client, rss)
    assert_good_client_equals_local_blocks(fuzz_model, fuzzed_swarm)


def stream_message(tensors: list[runtime_pb2.Tensor], metadata: dict) -> bytes:
    uid = span_uid(PREFIX, 0, NUM_BLOCKS)
    request = runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=pack_metadata(metadata))
    return frame(P2P.MESSAGE_MARKER, request.SerializeToString())


def test_streams_that_stall_half_way_are_refused_at_the_receive_deadline_and_released(fuzzed_swarm, client):
    """Clients that stop sending (after a first message, inside one, before any) hold the server only until
    the receive timeout: then each is refused, and no stream of theirs is left open."""
    parts = list(split_tensor(serialize_tensor(torch.randn(2, 300, HIDDEN)), chunk_bytes=64 * 1024))
    first = stream_message(parts[:1], {"request_id": "stalled"})
    stalls = {"after a first message": first, "inside a message": first[: len(first) // 2], "before any message": b""}
    results: list[tuple[str, object, float]] = []

    async def stall(name: str, data: bytes) -> None:
        reader, writer = await client.open_stream("forward")
        with contextlib.closing(writer):
            writer.write(data)
            await writer.drain()
            started = time.monotonic()
            outcome = await read_responses(reader)
            results.append((name, outcome, time.monotonic() - started))

    async def stall_all() -> None:
        await asyncio.gather(*(stall(name, data) for name, data in stalls.items()))

    with PeakRss(fuzzed_swarm.servers[0].pid) as rss:
        stalling = threading.Thread(target=client.connection.run, args=(stall_all(), RECEIVE_TIMEOUT + 60))
        stalling.start()
        held = 0
        while stalling.is_alive():
            info, _ = server_info(client.connection, client.peer_id)
            held = max(held, info["receiving_streams"])
            time.sleep(0.1)
        stalling.join()
        assert held == len(stalls), f"the server held {held} stalled streams at most, not {len(stalls)}"
        assert len(results) == len(stalls)
        for name, outcome, seconds in results:
            assert outcome.refusal is not None and outcome.refusal.kind == ErrorKind.BAD_REQUEST, (name, outcome)
            assert f"did not arrive whole within {RECEIVE_TIMEOUT:g} s" in outcome.refusal.message, name
            assert seconds >= RECEIVE_TIMEOUT / 2, (name, seconds)  # held until the deadline, not refused early
        assert_server_healthy(fuzzed_swarm, client, rss)


def test_a_stream_message_announcing_more_than_the_server_reads_is_refused_at_its_header(fuzzed_swarm, client):
    """A header announcing 1 TiB is refused at once; of the 128 MiB pushed after it the server keeps nothing."""
    pushed = [0]

    async def push() -> object:
        reader, writer = await client.open_stream("forward")
        with contextlib.closing(writer):
            writer.write(P2P.MESSAGE_MARKER + (2**40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
            responses = asyncio.ensure_future(read_responses(reader))
            chunk = bytes(1024 * 1024)
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                while not responses.done() and pushed[0] < 128 * 1024 * 1024:
                    writer.write(chunk)
                    await asyncio.wait_for(writer.drain(), 10)
                    pushed[0] += len(chunk)
            return await responses

    with PeakRss(fuzzed_swarm.servers[0].pid) as rss:
        outcome = client.connection.run(push(), timeout=300)
        assert outcome.refusal is not None and outcome.refusal.kind == ErrorKind.BAD_REQUEST, outcome
        assert "stream message of 1099511627776 bytes exceeds the server's limit" in outcome.refusal.message
        print(f"pushed {pushed[0] / 2**20:.0f} MiB after the header; server RSS grew by {rss.growth / 2**20:.1f} MiB")
        assert_server_healthy(fuzzed_swarm, client, rss)


@pytest.mark.parametrize(
    "part_bytes, parts_per_tensor, tensors, refusal",
    [(8192, MAX_PAYLOAD // 8192 + 8, 1, "payload exceeds"), (0, 500, 2, "parts")],
    ids=["bytes", "empty parts"],
)
def test_a_payload_over_the_limit_is_refused_however_finely_it_is_cut(
    fuzzed_swarm, client, part_bytes, parts_per_tensor, tensors, refusal
):
    """8 KiB parts beyond 3 MiB, or more empty parts than a 3 MiB payload may have: refused, nothing kept."""
    messages = []
    for index in range(tensors):
        header = runtime_pb2.Tensor(buffer=bytes(part_bytes), size=[1], dtype="uint8", chunks=parts_per_tensor)
        messages.append(stream_message([header], {"request_id": "finely cut"} if index == 0 else {}))
        part = stream_message([runtime_pb2.Tensor(buffer=bytes(part_bytes))], {})
        messages += [part] * (parts_per_tensor - 1)

    async def send() -> object:
        reader, writer = await client.open_stream("forward")
        with contextlib.closing(writer):
            writer.write(b"".join(messages) + END_OF_STREAM)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return await read_responses(reader)

    with PeakRss(fuzzed_swarm.servers[0].pid) as rss:
        outcome = client.connection.run(send(), timeout=120)
        assert outcome.refusal is not None and outcome.refusal.kind == ErrorKind.BAD_REQUEST, outcome
        assert refusal in outcome.refusal.message, outcome.refusal.message
        assert_server_healthy(fuzzed_swarm, client, rss)
