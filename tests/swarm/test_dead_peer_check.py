"""A client finds a server dead from the error's type and its daemon's connections, not from hivemind's words.

Real p2p daemons on loopback: a caller, a live peer that serves no block (it refuses the protocol), a peer
whose daemon is killed with SIGKILL, and a peer id that was never online. Only the last two are unreachable,
whatever text the daemon's error carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from ptune_search.swarm.client.connection import peer_unreachable
from ptune_search.swarm.protocol import BlockService
from ptune_search.swarm.signed_records import PeerKey

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def call_info(caller: P2P, peer) -> BaseException:
    try:
        await BlockService.get_stub(caller, peer).rpc_info(runtime_pb2.ExpertRequest(), timeout=30)
    except Exception as e:  # noqa: BLE001 - the error is what the test looks at
        return e
    raise AssertionError(f"peer {peer} answered an info call it cannot serve")


async def verdicts() -> dict[str, tuple[BaseException, bool]]:
    caller = await P2P.create(host_maddrs=LOOPBACK)
    others: list[P2P] = []
    try:
        initial_peers = [str(maddr) for maddr in await caller.get_visible_maddrs()]
        for _ in range(2):
            others.append(await P2P.create(host_maddrs=LOOPBACK, initial_peers=initial_peers))
        alive, victim = others
        found = {"alive": await call_info(caller, alive.peer_id)}
        await call_info(caller, victim.peer_id)  # connected once, as a client is to a server it used
        os.kill(victim._child.pid, signal.SIGKILL)
        await victim._child.wait()
        found["killed"] = await call_info(caller, victim.peer_id)
        nowhere = PeerKey().peer_id
        found["never online"] = await call_info(caller, nowhere)
        peers = {"alive": alive.peer_id, "killed": victim.peer_id, "never online": nowhere}
        result = {}
        for name, error in found.items():
            result[name] = (error, await peer_unreachable(caller, peers[name], error))
        reworded = P2PDaemonError("the daemon may say anything here")
        result["killed, reworded"] = (reworded, await peer_unreachable(caller, victim.peer_id, reworded))
        for name, error in [("handler error", P2PHandlerError("x")), ("timeout", asyncio.TimeoutError())]:
            result[name] = (error, await peer_unreachable(caller, victim.peer_id, error))
        return result
    finally:
        for peer in [*others, caller]:
            with contextlib.suppress(Exception):
                await peer.shutdown()


def test_a_killed_or_absent_peer_is_unreachable_and_a_live_one_or_a_handler_error_is_not():
    found = asyncio.run(verdicts())
    shown = {name: (type(error).__name__, str(error)[:80], verdict) for name, (error, verdict) in found.items()}
    print(shown)
    assert {name: verdict for name, (_, verdict) in found.items()} == {
        "alive": False,
        "killed": True,
        "never online": True,
        "killed, reworded": True,
        "handler error": False,
        "timeout": False,
    }, shown
