"""Watching a fuzzed server from outside: the peak of its resident memory, and what its info RPC reports."""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.protocol import BlockService, unpack_metadata


class PeakRss:
    """Samples a process's RSS every ``period`` seconds in a thread while in use; ``peak`` and ``start`` in bytes."""

    def __init__(self, pid: int, period: float = 0.02):
        self.process = psutil.Process(pid)
        self.period = period
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.period)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(10)


def server_info(connection: SwarmConnection, peer_id: PeerID, timeout: float = 30.0) -> tuple[dict[str, Any], float]:
    """The server's info and how many seconds it took to come back."""
    stub = BlockService.get_stub(connection.p2p, peer_id)
    started = time.monotonic()
    response = connection.run(stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=timeout), timeout=timeout + 5)
    return unpack_metadata(response.metadata), time.monotonic() - started


def wait_for_idle(connection: SwarmConnection, peer_id: PeerID, timeout: float) -> dict[str, Any]:
    """Poll info until no request is queued and no request stream is being received; the last info."""
    deadline = time.monotonic() + timeout
    while True:
        info, _ = server_info(connection, peer_id)
        if (info["queue"] == 0 and info["receiving_streams"] == 0) or time.monotonic() > deadline:
            return info
        time.sleep(0.2)
