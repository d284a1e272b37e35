"""The swarm over a simulated wide-area network: hosts in network namespaces, links with latency and loss.

A bootstrap peer, ``--servers`` block servers (``--replicas`` per span) of a generated Llama and
``--client-hosts`` client hosts each run in a network namespace of their own, joined by a user-space switch
that delays, jitters and drops frames (:mod:`benchmarks.wan.delay_switch`; this kernel has no netem), with
each host's upload limited by ``tc tbf``. For each round-trip time, the clients' counts run one after the
other, each for ``--seconds``: every client steps through all blocks (forward and backward of
``--batch x --length`` hidden states). Merging on and off each get a swarm of their own.

One JSON line per run::

    {"benchmark": "wan_swarm", "rtt_ms": 100, "clients": 16, "merging": true, "tokens_per_s": 812.4,
     "step_s_p50": 1.01, "step_s_p99": 1.35, "max_over_min_client": 1.08, "requests_by_server": {...},
     "replica_split": 0.55, "merged_requests_per_batch": 1.9, "failed_steps": 0, ...}

and a summary last (``latency_hidden_16``: 16 clients' tokens/s at 100 ms over the same at 0 ms;
``p99_over_p50``, ``max_over_min_client`` and ``replica_split``, the largest share of one span's requests on
one of its replicas: the worst over the runs of 4 clients or more; ``failed_steps``: all runs).

Run as root from the repository root: ``python -m benchmarks.wan_swarm --quick`` (RTT 0 and 100 ms; 1, 16 and
64 clients; merging on; within 5 minutes on 2 cores) or with ``--rtt-ms``, ``--clients``, ``--merging``.
It removes its namespaces, switch and processes on exit, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, ContextManager, Iterator, Optional, Sequence

from benchmarks.load_harness.runner import info_growth, server_infos
from benchmarks.swarm_step import steps_done
from benchmarks.wan.clients import ClientHostSpec
from benchmarks.wan.network import WanNetwork, unavailable_reason
from benchmarks.wan.placement import ClientHosts, NamespacedSwarm, client_host, server_host
from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.server.fair_queue import MergeLimits
from ptune_search.swarm.server.settings import ServerSettings
from ptune_search.tiny_llama import make_tiny_llama

COMPUTE_COUNTERS = ("tasks", "merged_batches", "merged_requests")
QUICK = {"rtt_ms": [0, 100], "clients": [1, 16, 64], "merging": [True], "seconds": 12.0}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def requests_by_server(before: dict[str, dict], after: dict[str, dict]) -> dict[str, int]:
    """Requests each server took between two info snapshots (a merged batch counts its requests)."""
    tasks, batches, merged = (info_growth(before, after, "compute", key) for key in COMPUTE_COUNTERS)
    return {name: tasks[name] - batches[name] + merged[name] for name in tasks}


def merges(before: dict[str, dict], after: dict[str, dict]) -> tuple[int, int]:
    """Merged batches of all servers between two info snapshots, and the requests in them."""
    _, batches, merged = (sum(info_growth(before, after, "compute", key).values()) for key in COMPUTE_COUNTERS)
    return batches, merged


def replica_split(swarm: NamespacedSwarm, requests: dict[str, int]) -> Optional[float]:
    """The largest share of one span's requests that went to one of its replicas (0.5: even)."""
    spans: dict[tuple[int, int], list[int]] = {}
    for child in swarm.servers:
        spans.setdefault(child.span, []).append(requests.get(child.name, 0))
    shares = [max(counts) / sum(counts) for counts in spans.values() if len(counts) > 1 and sum(counts)]
    return round(max(shares), 3) if shares else None


def run_record(results: list[dict[str, Any]], until: float, tokens_per_step: int) -> dict[str, Any]:
    """Aggregate tokens/s while all clients ran (a step in flight at the end counted by its elapsed share),
    step-time percentiles, the spread of the clients' rates and their failures."""
    start = max(result["marks"][0] for result in results)
    window = until - start
    progress = [steps_done(result["marks"], until) - steps_done(result["marks"], start) for result in results]
    rates = [steps * tokens_per_step / window for steps in progress]
    step_s = [b - a for result in results for a, b in zip(result["marks"], result["marks"][1:])]
    errors = [error for result in results for error in result["errors"]]
    return {
        "tokens_per_s": round(sum(rates), 1),
        "window_s": round(window, 2),
        "steps": len(step_s),
        "step_s_p50": round(percentile(step_s, 0.5), 3),
        "step_s_p99": round(percentile(step_s, 0.99), 3),
        "max_over_min_client": round(max(rates) / min(rates), 3) if min(rates) > 0 else None,
        "failed_steps": sum(result["failed"] for result in results),
        "wrong_results": sum(result["wrong"] for result in results),
        "errors": errors[:3],
    }


@dataclasses.dataclass
class Testbed:
    """A swarm on its hosts, a connection of this process to it, and the client hosts."""

    args: argparse.Namespace
    network: WanNetwork
    swarm: NamespacedSwarm
    connection: SwarmConnection
    client_hosts: ClientHosts

    def measure(self, clients: int, seconds: float, fault: Optional[ContextManager[object]] = None) -> dict[str, Any]:
        """``clients`` clients for ``seconds`` (within ``fault``): their figures and what the servers did. The
        servers' counters are read within ``fault`` (a host cut off still answers this process): what a cut
        server did counts while it is cut off, not its stale requests delivered once it is healed."""
        with fault or contextlib.nullcontext():
            before = server_infos(self.swarm, self.connection)
            results, until = self.client_hosts.run(clients, seconds)
            after = server_infos(self.swarm, self.connection)
        requests = requests_by_server(before, after)
        batches, merged = merges(before, after)
        return {
            **run_record(results, until, self.args.batch * self.args.length),
            "requests_by_server": requests,
            "replica_split": replica_split(self.swarm, requests),
            "merged_requests_per_batch": round(merged / batches, 2) if batches else None,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }


@contextlib.contextmanager
def testbed(args: argparse.Namespace, model: Path, merging: bool, work: Path) -> Iterator[Testbed]:
    hosts = ["bootstrap", *map(server_host, range(args.servers)), *map(client_host, range(args.client_hosts))]
    settings = ServerSettings(merge=MergeLimits() if merging else MergeLimits(max_tokens=0))
    clients = max(args.clients) if not args.faults else args.fault_clients
    spec = ClientHostSpec(
        str(model), [], clients, args.batch, args.length, args.request_timeout, not args.connection_per_client
    )
    log_dir = work / f"merging-{merging}"
    with WanNetwork(hosts) as network:
        for host in hosts:
            network.rate(host, args.rate_mbit)
        swarm = NamespacedSwarm(network, model, args.servers, args.replicas, settings=settings, log_dir=log_dir)
        with swarm, SwarmConnection(swarm.initial_peers) as connection:
            spec = dataclasses.replace(spec, initial_peers=swarm.initial_peers)
            with ClientHosts(network, args.client_hosts, spec, log_dir) as client_hosts:
                yield Testbed(args, network, swarm, connection, client_hosts)
            emit({"benchmark": "wan_swarm_switch", "merging": merging, **network.switch_stats()})


def sweep(bed: Testbed, merging: bool) -> list[dict[str, Any]]:
    records = []
    for rtt in bed.args.rtt_ms:
        bed.network.shape_all(delay_ms=rtt / 4, jitter_ms=rtt / 40, loss=bed.args.loss)
        for clients in bed.args.clients:
            record = {"benchmark": "wan_swarm", "rtt_ms": rtt, "clients": clients, "merging": merging}
            record.update(bed.measure(clients, bed.args.seconds))
            emit(record)
            records.append(record)
    return records


@contextlib.contextmanager
def shaped(network: WanNetwork, host: str, during: dict[str, Any], after: dict[str, Any]) -> Iterator[None]:
    network.shape(host, **during)
    try:
        yield
    finally:
        network.shape(host, **after)


@contextlib.contextmanager
def rate_limited(network: WanNetwork, host: str, mbit: float, after: Optional[float]) -> Iterator[None]:
    network.rate(host, mbit)
    try:
        yield
    finally:
        network.rate(host, after)


def faults(bed: Testbed) -> list[dict[str, Any]]:
    """Faults on the links while ``--fault-clients`` clients train at ``--fault-rtt-ms``, one phase each: a
    partition that cuts server 0's host off, the phase after it (server 0 must come back), 10 % loss on server
    1's link, and server 2's upload at 1 Mbit/s."""
    args, network = bed.args, bed.network
    rtt = args.fault_rtt_ms
    network.shape_all(delay_ms=rtt / 4, jitter_ms=rtt / 40)
    cut, lossy, slow = (server_host(index % args.servers) for index in range(3))
    phases: list[tuple[str, float, Optional[ContextManager[object]]]] = [
        ("steady", args.seconds, None),
        ("partition", args.partition_s, shaped(network, cut, {"cut": True}, {"cut": False})),
        ("healed", args.heal_s, None),
        ("loss_10", args.seconds, shaped(network, lossy, {"loss": 0.1}, {"loss": 0.0})),
        ("slow_link", args.seconds, rate_limited(network, slow, 1.0, args.rate_mbit)),
    ]
    records = []
    for phase, seconds, fault in phases:
        record = {"benchmark": "wan_swarm_fault", "phase": phase, "rtt_ms": rtt, "clients": args.fault_clients}
        record.update(bed.measure(args.fault_clients, seconds, fault))
        emit(record)
        records.append(record)
    return records


def faults_summary(bed: Testbed, records: list[dict[str, Any]]) -> dict[str, Any]:
    cut = bed.swarm.servers[0].name
    by_phase = {record["phase"]: record for record in records}
    return {
        "benchmark": "wan_swarm_faults_summary",
        "tokens_per_s_by_phase": {phase: record["tokens_per_s"] for phase, record in by_phase.items()},
        "step_s_p99_by_phase": {phase: record["step_s_p99"] for phase, record in by_phase.items()},
        "cut_server_requests": {
            phase: by_phase[phase]["requests_by_server"].get(cut, 0) for phase in ("partition", "healed")
        },
        "failed_steps": sum(record["failed_steps"] for record in records),
        "wrong_results": sum(record["wrong_results"] for record in records),
    }


def rates_by_clients(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    rates: dict[str, dict[str, float]] = {}
    for r in records:
        key = f"{r['rtt_ms']}ms{'' if r['merging'] else '_no_merge'}"
        rates.setdefault(key, {})[str(r["clients"])] = r["tokens_per_s"]
    return rates


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    def rate(rtt: int, clients: int) -> Optional[float]:
        found = [r["tokens_per_s"] for r in records if r["rtt_ms"] == rtt and r["clients"] == clients and r["merging"]]
        return found[0] if found else None

    busy = [r for r in records if r["clients"] >= 4]
    hidden = rate(100, 16), rate(0, 16)
    splits = [r["replica_split"] for r in busy if r["replica_split"] is not None]
    spreads = [r["max_over_min_client"] for r in busy if r["max_over_min_client"] is not None]
    tails = [round(r["step_s_p99"] / r["step_s_p50"], 3) for r in busy if r["step_s_p50"]]
    return {
        "benchmark": "wan_swarm_summary",
        "rtt_ms": sorted({r["rtt_ms"] for r in records}),
        "tokens_per_s_by_clients": rates_by_clients(records),
        "latency_hidden_16": round(hidden[0] / hidden[1], 3) if all(hidden) else None,
        "p99_over_p50": max(tails, default=None),
        "max_over_min_client": max(spreads, default=None),
        "replica_split": max(splits, default=None),
        "failed_steps": sum(r["failed_steps"] for r in records),
        "wrong_results": sum(r["wrong_results"] for r in records),
        "cpus": os.cpu_count(),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="RTT 0 and 100 ms; 1, 16, 64 clients; merging on")
    parser.add_argument("--rtt-ms", type=int, nargs="+", default=[0, 50, 100, 150])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--merging", choices=["on", "off", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=20.0, help="each run's training time")
    parser.add_argument("--servers", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--client-hosts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="each host's upload")
    parser.add_argument("--loss", type=float, default=0.0, help="share of frames lost on each link")
    parser.add_argument(
        "--connection-per-client",
        action="store_true",
        help="each client its own p2p daemon and peer id (default: one per client host)",
    )
    parser.add_argument("--request-timeout", type=float, help="seconds (default: 30, with --faults 5)")
    parser.add_argument("--faults", action="store_true", help="the link faults' phases instead of the sweep")
    parser.add_argument("--fault-clients", type=int, default=4)
    parser.add_argument("--fault-rtt-ms", type=int, default=50)
    parser.add_argument("--partition-s", type=float, default=20.0, help="how long server 0's host is cut off")
    parser.add_argument("--heal-s", type=float, default=40.0, help="the phase after the partition")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=8)
    args = parser.parse_args(argv)
    if args.quick:
        args.rtt_ms, args.clients, args.seconds = QUICK["rtt_ms"], QUICK["clients"], QUICK["seconds"]
        args.merging = "on"
    reason = unavailable_reason()
    if reason:
        print(f"wan_swarm {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the with-blocks: nothing is left behind
    if args.request_timeout is None:
        args.request_timeout = 5.0 if args.faults else 30.0
    with tempfile.TemporaryDirectory(prefix="wan-swarm-") as work:
        model = make_tiny_llama(Path(work) / "model", hidden_size=args.hidden_size, num_layers=args.blocks)
        if args.faults:
            with testbed(args, model, True, Path(work)) as bed:
                emit(faults_summary(bed, faults(bed)))
            return 0
        records = []
        for merging in {"on": [True], "off": [False], "both": [True, False]}[args.merging]:
            with testbed(args, model, merging, Path(work)) as bed:
                records += sweep(bed, merging)
    emit(summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
