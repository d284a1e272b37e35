"""A client's door to the swarm: a client-mode DHT node and its p2p daemon on a background event loop.

Synchronous code (autograd functions, tests, launchers) calls ``connection.run(coroutine)``. The p2p daemon
is shut down by :meth:`SwarmConnection.close`, when the connection is garbage collected, or at exit.

Example::

    from ptune_search.swarm.client.routing import fetch_block_records

    with SwarmConnection(initial_peers) as connection:  # multiaddrs like /ip4/10.0.0.5/tcp/31337/p2p/Qm...
        records = connection.run(fetch_block_records(connection.node, ["m.0", "m.1"]))
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Optional, Sequence, TypeVar

if TYPE_CHECKING:
    from hivemind.dht import DHTNode
    from hivemind.p2p import P2P, PeerID

T = TypeVar("T")


class SwarmConnection:
    def __init__(self, initial_peers: Sequence[str], *, startup_timeout: float = 60.0):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddrs of a bootstrap peer of the swarm")
        from ptune_search.swarm.record_bounds import RecordLimits, join_dht
        from ptune_search.swarm.signed_records import SwarmRecordValidator

        self.initial_peers = list(initial_peers)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarm-connection", daemon=True)
        self._thread.start()
        try:
            self.node: "DHTNode" = self.run(
                join_dht(
                    RecordLimits(),  # refuses values of more records than an honest node holds
                    SwarmRecordValidator(),  # drops unsigned and forged records it finds
                    initial_peers=self.initial_peers,
                    client_mode=True,
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                ),
                timeout=startup_timeout,
            )
        except BaseException as e:
            _stop_loop(self._loop, self._thread)
            raise ConnectionError(
                f"could not join the swarm through {self.initial_peers}: {type(e).__name__}: {e}. "
                "Is a bootstrap peer running (`ptune-search swarm dht` or `swarm local`)?"
            ) from e
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._thread, self.node)

    @property
    def p2p(self) -> "P2P":
        return self.node.p2p

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def run(self, coroutine: Awaitable[T], timeout: Optional[float] = None) -> T:
        """Run ``coroutine`` on the connection's loop and wait for its result (never call from that loop)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"swarm operation did not finish within {timeout} s") from None
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        if hasattr(self, "_finalizer"):
            self._finalizer()

    def __enter__(self) -> "SwarmConnection":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


async def peer_unreachable(p2p: "P2P", peer_id: "PeerID", error: BaseException) -> bool:
    """Whether a call to ``peer_id`` failed because the peer cannot be reached at all (its p2p daemon is gone).

    Decided from structure, not from the daemon's words: our p2p daemon itself failed the call (a
    ``P2PDaemonError``: it could not open a stream; an error of the peer's handler is a ``P2PHandlerError``,
    a timeout a ``TimeoutError``) and it holds no connection to the peer. A live peer that refuses the
    protocol, or a slow one, keeps its connection, so it is only banned; a killed one has none, and a dial
    to it fails at once.
    """
    from hivemind.p2p import P2PDaemonError

    if not isinstance(error, P2PDaemonError):
        return False
    try:
        connected = await p2p.list_peers()
    except Exception:  # noqa: BLE001 - our own daemon failing says nothing about the peer
        return False
    return all(info.peer_id != peer_id for info in connected)


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread, node: "DHTNode") -> None:
    if loop.is_running():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_shutdown_node(node), loop).result(15)
    _stop_loop(loop, thread)


async def _shutdown_node(node: "DHTNode") -> None:
    """Stop the node and its p2p daemon, then cancel what is left on the loop (hivemind's background tasks)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(node.shutdown(), 10)
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if loop.is_running():
        loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        thread.join(10)
    if not loop.is_running() and not loop.is_closed():
        with contextlib.suppress(Exception):
            loop.close()
