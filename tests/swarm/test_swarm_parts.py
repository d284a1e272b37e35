"""The swarm's parts on their own: fair queue, host cores, activation cache, wire format, uids, records, routing."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import fcntl
import os
import pickle
import random
import threading
import time

import pytest
import torch
from hivemind.p2p import PeerID
from swarm_testing import started_task, until

from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.client.routing import BlockRouter, MissingBlockError
from ptune_search.swarm.protocol import (
    ErrorKind,
    RequestRefused,
    ServerRecord,
    ServerState,
    model_prefix,
    parse_span_uid,
    span_uid,
    unpack_metadata,
)
from ptune_search.swarm.server.activation_cache import ActivationCache
from ptune_search.swarm.server.fair_queue import FairQueue, QueueFull
from ptune_search.swarm.server.host_cores import HostCores
from ptune_search.swarm.wire import PayloadTooLarge, TensorAssembler, deserialize_tensor, serialize_tensor, split_tensor


def test_fair_queue_serves_clients_in_turn_so_a_burst_does_not_starve_others():
    queue = FairQueue()
    queue.start()
    order: list[str] = []
    release = threading.Event()
    started, blocking = started_task(release)

    async def scenario():
        blocker = asyncio.ensure_future(queue.run("x", blocking))
        await until(started.is_set)
        burst = [asyncio.ensure_future(queue.run("a", lambda i=i: order.append(f"a{i}"))) for i in range(3)]
        other = asyncio.ensure_future(queue.run("b", lambda: order.append("b0")))
        await until(lambda: queue.pending == 4)
        release.set()
        await asyncio.gather(blocker, *burst, other)

    try:
        asyncio.run(scenario())
    finally:
        queue.close()
    assert order == ["a0", "b0", "a1", "a2"]


def test_fair_queue_refuses_work_beyond_its_limit_and_reports_task_errors():
    queue = FairQueue(max_pending=1)
    queue.start()
    release = threading.Event()
    started, blocking = started_task(release)

    async def scenario():
        running = asyncio.ensure_future(queue.run("a", blocking))
        await until(started.is_set)
        waiting = asyncio.ensure_future(queue.run("a", lambda: 1))
        await until(lambda: queue.pending == 1)
        with pytest.raises(QueueFull, match="queue is full"):
            await queue.run("b", lambda: 2)
        release.set()
        assert await waiting == 1
        await running
        with pytest.raises(ZeroDivisionError):
            await queue.run("a", lambda: 1 / 0)

    try:
        asyncio.run(scenario())
    finally:
        queue.close()


@dataclasses.dataclass
class Kept:
    nbytes: int
    created: float = dataclasses.field(default_factory=time.monotonic)


def test_activation_cache_evicts_oldest_entries_to_stay_within_its_byte_budget():
    cache = ActivationCache(max_bytes=100, max_age=60.0)
    assert cache.put("a", Kept(40)) and cache.put("b", Kept(40))
    assert cache.put("c", Kept(40))  # evicts "a"
    assert not cache.put("huge", Kept(101))
    assert cache.pop("a") is None and cache.pop("b") is not None
    assert cache.nbytes == 40 and cache.evictions == 1


def test_activation_cache_drops_entries_older_than_max_age():
    cache = ActivationCache(max_bytes=100, max_age=60.0)
    cache.put("old", Kept(10, created=time.monotonic() - 61.0))  # made a minute ago: no sleeping in the test
    cache.put("new", Kept(10))
    assert cache.pop("old") is None and cache.pop("new") is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_tensors_survive_serialization_and_streaming_in_chunks(dtype):
    tensor = (torch.randn(3, 50, 7) * 100).to(dtype)
    assembler = TensorAssembler(max_bytes=10**6)
    for other in (tensor, tensor[:1]):
        for part in split_tensor(serialize_tensor(other), chunk_bytes=256):
            assembler.add(part)
    first, second = assembler.tensors()
    assert torch.equal(first, tensor) and torch.equal(second, tensor[:1])


def test_tensor_stream_is_refused_beyond_its_byte_limit_or_with_inconsistent_chunks():
    parts = list(split_tensor(serialize_tensor(torch.zeros(1000)), chunk_bytes=1000))
    assembler = TensorAssembler(max_bytes=2000)
    with pytest.raises(PayloadTooLarge, match="limit of 2000 bytes"):
        for part in parts:
            assembler.add(part)
    with pytest.raises(ValueError, match="belongs to no tensor"):
        TensorAssembler(10**6).add(parts[1])
    truncated = TensorAssembler(10**6)
    truncated.add(parts[0])
    with pytest.raises(ValueError, match="announced 4 parts but 1 arrived"):
        truncated.tensors()


def test_tensors_of_inconsistent_size_are_refused():
    message = serialize_tensor(torch.zeros(2, 3))
    message.size[:] = [2, 4]
    with pytest.raises(ValueError, match="needs 32"):
        deserialize_tensor(message)


def test_span_uids_name_consecutive_blocks_of_one_model():
    assert span_uid("m", 3, 6) == "m.3 m.4 m.5"
    assert parse_span_uid("m.3 m.4 m.5") == ("m", 3, 6)
    assert parse_span_uid("a.b-c.0") == ("a.b-c", 0, 1)
    for bad in ["", "m.3 m.5", "m.3 n.4", "m", "m.x", ".3"]:
        with pytest.raises(ValueError):
            parse_span_uid(bad)


def test_model_prefix_comes_from_dht_prefix_or_the_checkpoint_folder():
    class Config:
        dht_prefix = None
        _name_or_path = "/models/SmolLM2-135M/"

    assert model_prefix(Config()) == "SmolLM2-135M"
    Config.dht_prefix = "my model.v2"
    assert model_prefix(Config()) == "my-model-v2"
    Config.dht_prefix, Config._name_or_path = None, ""
    with pytest.raises(ValueError, match="set config.dht_prefix"):
        model_prefix(Config())


def test_server_records_round_trip_and_garbage_is_rejected():
    record = ServerRecord(ServerState.ONLINE, 2, 5, throughput=123.0, dtype="bfloat16")
    assert ServerRecord.from_dict(record.to_dict()) == record
    for garbage in [None, [], {"state": "dancing", "start": 0, "end": 1}, {"state": "online", "start": 3, "end": 1}]:
        with pytest.raises(ValueError):
            ServerRecord.from_dict(garbage)
    with pytest.raises(ValueError, match="not valid msgpack"):
        unpack_metadata(b"\xc1")


def peer(index: int) -> PeerID:
    return PeerID(bytes([0x00, 0x24]) + bytes([index]) * 36)


def test_router_prefers_long_spans_avoids_banned_servers_and_retries_them_when_nothing_else_is_left():
    router = BlockRouter(None, "m", 4, ClientConfig(route_update_period=float("inf")))
    router._updated = time.monotonic()
    whole, first, second = peer(1), peer(2), peer(3)
    router._online = [
        {whole: ServerRecord(ServerState.ONLINE, 0, 4), first: ServerRecord(ServerState.ONLINE, 0, 2)},
        {whole: ServerRecord(ServerState.ONLINE, 0, 4), first: ServerRecord(ServerState.ONLINE, 0, 2)},
        {whole: ServerRecord(ServerState.ONLINE, 0, 4), second: ServerRecord(ServerState.ONLINE, 2, 4)},
        {whole: ServerRecord(ServerState.ONLINE, 0, 4), second: ServerRecord(ServerState.ONLINE, 2, 4)},
    ]
    spans = {(s.peer_id, s.start, s.end) for s in router._candidates(1, 4)}
    assert spans == {(whole, 1, 4), (first, 1, 2)}
    router.ban(whole)
    assert asyncio.run(router.choose_span(0)).peer_id == first
    router.ban(second)
    assert asyncio.run(router.choose_span(2, 3)).peer_id in {whole, second}  # all banned: try them anyway


def test_router_sends_forwards_by_answer_time_and_tries_again_a_server_measured_long_ago():
    router = BlockRouter(None, "m", 4, ClientConfig(route_update_period=float("inf")))
    router._updated = time.monotonic()
    near, far = peer(1), peer(2)
    router._online = [{near: ServerRecord(ServerState.ONLINE, 0, 4), far: ServerRecord(ServerState.ONLINE, 0, 4)}] * 4

    def share_of_near(draws: int = 2000) -> float:
        async def choose() -> list:
            return [(await router.choose_span(0)).peer_id for _ in range(draws)]

        return asyncio.run(choose()).count(near) / draws

    random.seed(0)
    assert 0.45 < share_of_near() < 0.55  # nothing measured: by span length alone
    router.record_answer(near, 0.1)
    router.record_answer(far, 0.5)  # 25 times the weight for the near one
    assert 0.95 < share_of_near() < 0.99
    for _ in range(20):
        router.record_answer(far, 0.1)  # the far one got as fast: its average follows
    assert 0.45 < share_of_near() < 0.55
    router.record_answer(far, 5.0)
    seconds, _ = router._answer_s[far]
    router._answer_s[far] = (seconds, time.monotonic() - 61)  # measured too long ago: as fast as the fastest
    assert 0.45 < share_of_near() < 0.55


def hold_in_thread(
    cores: HostCores, held: list[int], release: threading.Event, holding: threading.Semaphore
) -> threading.Thread:
    def task():
        with cores.hold() as count:
            held.append(count)
            holding.release()
            release.wait(120)

    thread = threading.Thread(target=task)
    thread.start()
    return thread


def note_others_waiting(cores: HostCores, seen: threading.Event) -> None:
    """Set ``seen`` once ``cores``, first in line, sees another server waiting for cores too."""
    others_waiting = cores._others_waiting

    def noted() -> bool:
        others = others_waiting()
        if others:
            seen.set()
        return others

    cores._others_waiting = noted


def test_host_cores_go_all_to_a_lone_task_and_one_each_to_tasks_waiting_together(tmp_path):
    first, second, third = (HostCores(tmp_path / "cores", cores=2) for _ in range(3))
    release, holding = threading.Event(), threading.Semaphore(0)
    second_held, third_held = [], []
    both_waiting = threading.Event()
    for waiter in (second, third):
        note_others_waiting(waiter, both_waiting)
    try:
        with first.hold() as held:
            assert held == 2
            threads = [
                hold_in_thread(second, second_held, release, holding),
                hold_in_thread(third, third_held, release, holding),
            ]
            assert both_waiting.wait(120)  # the first in line sees the other waiting behind it
            assert second_held == third_held == []  # every core is in use: both wait
        assert holding.acquire(timeout=120) and holding.acquire(timeout=120)
        assert second_held == [1] and third_held == [1]  # side by side, a core each
        release.set()
        for thread in threads:
            thread.join()
        lone = hold_in_thread(second, second_held, release, holding)
        lone.join()
        assert second_held[-1] == 2  # nobody else wants cores: all of them
    finally:
        release.set()
        for cores in (first, second, third):
            cores.close()


def test_fair_queue_sets_the_threads_to_the_cores_each_task_holds(tmp_path):
    threads_used: list[int] = []
    cores = HostCores(tmp_path / "cores", cores=2)
    queue = FairQueue(cores=cores, set_threads=threads_used.append, threads=2)
    queue.start()
    busy_core = os.open(tmp_path / "cores.0", os.O_RDWR)

    async def scenario():
        await queue.run("a", lambda: None)
        fcntl.flock(busy_core, fcntl.LOCK_EX)  # another server computes on one core
        try:
            await queue.run("b", lambda: None)
        finally:
            fcntl.flock(busy_core, fcntl.LOCK_UN)

    try:
        asyncio.run(scenario())
    finally:
        queue.close()
        cores.close()
        os.close(busy_core)
    assert threads_used == [2, 1]  # the worker's start, then b's task on the one free core
    assert queue.stats["shared_core_tasks"] == 1


@pytest.mark.parametrize(
    "error",
    [RequestRefused(ErrorKind.BAD_REQUEST, "hidden size 32, expected 64"), MissingBlockError("m.3", 3, 5.0, False)],
    ids=["refused", "missing-block"],
)
def test_swarm_errors_survive_the_copy_and_pickle_ray_applies_to_a_trial_error(error: Exception):
    for clone in (copy.copy(error), copy.deepcopy(error), pickle.loads(pickle.dumps(error))):
        assert type(clone) is type(error) and str(clone) == str(error)
