"""The search with its block servers across a simulated wide-area network, against the same search at 0 ms.

The config's servers (``swarm.servers``, ``swarm.replicas``) and a bootstrap peer run each in a network
namespace of its own on the delay switch of :mod:`benchmarks.wan.network`; the search runs here, its trials
reaching the servers through this process's port on the switch, as an external swarm
(``swarm.mode: external``). Every host's link, this one's included, gets a quarter of the round-trip time
each way, so a trial's request to a server and its answer take the round trip. For each round trip and
each ``--concurrent`` count of trials at once, one search runs from scratch. One JSON line per search, then a
summary::

    {"benchmark": "wan_search", "rtt_ms": 100, "concurrent_trials": 4, "wall_s": 181.2, ...}
    {"benchmark": "wan_search_summary", "wall_s": {"0ms": {"2": 61.0, "4": 58.2}, "100ms": {...}},
     "rtt_over_0ms": {"100ms": {"2": 2.9, "4": 2.1}}, ...}

Run as root from the repository root: ``python -m benchmarks.wan_search [--config experiments/tiny.yaml]
[--rtt-ms 0 100] [--concurrent 2 4] [--set key=value ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.wan.network import CONTROL, WanNetwork, unavailable_reason
from benchmarks.wan.placement import NamespacedSwarm, server_host
from ptune_search.config import load_config
from ptune_search.pretrained import resolve_model
from ptune_search.search.driver import run_search

REPOSITORY = Path(__file__).resolve().parents[1]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def timed_search(args: argparse.Namespace, peers: list[str], output_dir: Path, concurrent: int) -> dict[str, Any]:
    overrides = [
        *args.set,
        "swarm.mode=external",
        f"swarm.initial_peers={json.dumps(peers)}",
        f"budget.max_concurrent_trials={concurrent}",
        f"output_dir={output_dir}",
    ]
    config = load_config(args.config, overrides)
    started = time.time()
    outcome = run_search(config)
    return {
        "wall_s": round(time.time() - started, 1),
        "trials": len(outcome.trials),
        "best_val_accuracy": outcome.best_trial.get("val_accuracy"),
    }


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    walls: dict[str, dict[str, float]] = {}
    for record in records:
        walls.setdefault(f"{record['rtt_ms']}ms", {})[str(record["concurrent_trials"])] = record["wall_s"]
    base = walls.get("0ms", {})
    ratios = {
        rtt: {k: round(wall / base[k], 3) for k, wall in by_k.items() if k in base}
        for rtt, by_k in walls.items()
        if rtt != "0ms"
    }
    return {"benchmark": "wan_search_summary", "wall_s": walls, "rtt_over_0ms": ratios, "cpus": os.cpu_count()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPOSITORY / "experiments" / "tiny.yaml"))
    parser.add_argument("--rtt-ms", type=int, nargs="+", default=[0, 100])
    parser.add_argument("--concurrent", type=int, nargs="+", default=[2, 4], help="trials at once")
    parser.add_argument("--set", action="append", default=[], help="a config override, as for `ptune-search search`")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"wan_search {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the with-blocks: nothing is left behind
    config = load_config(args.config, args.set)
    model = resolve_model(config.model)
    servers, replicas = config.swarm.servers, config.swarm.replicas
    records = []
    with tempfile.TemporaryDirectory(prefix="wan-search-") as work:
        with WanNetwork(["bootstrap", *map(server_host, range(servers))]) as network:
            swarm = NamespacedSwarm(network, model, servers, replicas, log_dir=Path(work) / "swarm")
            with swarm:
                for rtt in args.rtt_ms:
                    network.shape_all(delay_ms=rtt / 4, jitter_ms=rtt / 40)
                    network.shape(CONTROL, delay_ms=rtt / 4, jitter_ms=rtt / 40)
                    for concurrent in args.concurrent:
                        output_dir = Path(work) / f"search-{rtt}ms-{concurrent}"
                        record = {"benchmark": "wan_search", "rtt_ms": rtt, "concurrent_trials": concurrent}
                        record.update(timed_search(args, swarm.initial_peers, output_dir, concurrent))
                        record["load_avg_1m"] = round(os.getloadavg()[0], 2)
                        emit(record)
                        records.append(record)
    emit(summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
