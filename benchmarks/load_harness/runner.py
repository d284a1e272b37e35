"""Many prompt-tuning clients on one swarm at once, for a fixed time, with the servers' memory sampled.

:func:`run_load` starts the clients (each its own process, see :mod:`.client` and :mod:`.launcher`),
waits until all have finished their warm-up steps, takes the servers' memory and counters as the start,
lets every client train until one common deadline, samples the servers' RSS meanwhile, and returns a
:class:`LoadReport`. Clients that fail, hang or die are counted in the report, never dropped; whatever
happens, no client process or p2p daemon outlives the call.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from benchmarks.load_harness.client_processes import ClientProcesses
from benchmarks.load_harness.memory import server_memory_traces
from benchmarks.load_harness.report import LoadReport
from benchmarks.load_harness.shape import LoadShape

if TYPE_CHECKING:
    from ptune_search.swarm.client.connection import SwarmConnection
    from ptune_search.swarm.launcher import LocalSwarm


def server_infos(swarm: "LocalSwarm", connection: "SwarmConnection") -> dict[str, dict[str, Any]]:
    """Each server's answer to the info RPC: its queue, compute and activation-cache counters."""
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    from ptune_search.swarm.protocol import BlockService, unpack_metadata

    async def ask(peer_id: str) -> dict[str, Any]:
        stub = BlockService.get_stub(connection.p2p, PeerID.from_base58(peer_id))
        return unpack_metadata((await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=60)).metadata)

    infos = {}
    for server in swarm.servers:
        if server.peer_id is not None and server.alive():
            infos[server.name] = connection.run(ask(server.peer_id), timeout=120)
    return infos


def info_growth(before: dict[str, dict], after: dict[str, dict], group: str, key: str) -> dict[str, int]:
    """Per server, how much the counter ``group.key`` of its info grew between two :func:`server_infos`."""
    return {name: info[group][key] - before.get(name, {}).get(group, {}).get(key, 0) for name, info in after.items()}


def run_load(
    model: str | Path, swarm: "LocalSwarm", shape: Optional[LoadShape] = None, work_dir: Optional[Path] = None
) -> LoadReport:
    """Run ``shape`` (default: 8 clients for 10 minutes) against ``swarm``, whose servers serve ``model``.

    Client logs, specs and results go to ``work_dir`` (default: ``<swarm log dir>/load-clients``).
    """
    from ptune_search.swarm.client.connection import SwarmConnection

    shape = shape or LoadShape()
    work_dir = Path(work_dir or swarm.log_dir / "load-clients")
    with (
        ClientProcesses(Path(model), swarm.initial_peers, shape, work_dir) as clients,
        SwarmConnection(swarm.initial_peers) as connection,
    ):
        clients.start()
        clients.wait_ready(shape.ready_timeout_s)
        traces = server_memory_traces(swarm)
        at_start = server_infos(swarm, connection)
        started = time.time()
        deadline = started + shape.duration_s
        clients.send_deadline(deadline)
        next_sample = started
        while clients.running() and time.time() < deadline + shape.finish_timeout_s:
            if time.time() >= next_sample:
                for trace in traces:
                    trace.sample(time.time() - started)
                next_sample += shape.sample_period_s
            time.sleep(min(0.2, shape.sample_period_s))
        clients.kill_if_running(f"still running {shape.finish_timeout_s:.0f} s after the deadline")
        wall = time.time() - started
        for trace in traces:
            trace.sample(wall)
        at_end = server_infos(swarm, connection)
        results = [clients.result(spec.client) for spec in clients.specs]
        session = clients.launcher.pid if clients.launcher is not None else 0
    return LoadReport(shape, results, traces, at_start, at_end, wall, session)
