"""Load on a loopback swarm: 8 prompt-tuning clients train at once for 10 minutes against 2 block servers.

The model is generated (``ptune_search.tiny_llama``): 8 Llama blocks of hidden 128, split 4 + 4 over the two
servers, so that each request is real block compute, not only transport. Each client is its own process
(4 train ``ptune``, 4 ``deep_ptune``; batch 8 x 64 tokens, pre_seq_len 16, AdamW on prompts and head), takes
2 warm-up steps, then all train until one deadline (see ``benchmarks.load_harness``). Meanwhile the RSS of
every server process and of its p2p daemon is sampled each second: "after_warmup" when the clients start
together, "start" 10 s later (all clients have had requests in flight at once by then), "end" when all
clients have finished; "growth" is the rise of the RSS level from "start" on (the median sample of the last
third of that span minus the median of its first third). Any exception in a client is counted and listed, a client
that dies or hangs too. Prints JSON lines::

    {"benchmark": "swarm_load_server", "server": "server-0-blocks-0-4", "rss_mib": {"after_warmup": 560.3,
     "start": 644.4, "end": 642.5, "max": 657.2, "growth": -1.9, "series": [[0.0, 560.3], ...]},
     "p2pd_rss_mib": {...}, "tasks": 9120, "busy_fraction": 0.69, "cache_at_end": {"bytes": 0, ...}}
    {"benchmark": "swarm_load_client", "client": 0, "mode": "ptune", "steps": 310, "tokens_per_s": 264.5,
     "failed_calls": 0, "exceptions": 0, ...}
    {"benchmark": "swarm_load_summary", "aggregate_tokens_per_s": 2110.3, "fairness_max_min": 1.12,
     "failed_calls": 0, "client_exceptions": 0, "rss_growth_mib": {...}, ...}

Tokens count the batch's input tokens (batch x length), not the prompt positions. Exits 1 if any client
raised or made no progress, or any swarm call failed.

Run: ``python -m benchmarks.swarm_load [--minutes 10] [--clients 8] [--model PATH_OR_ALIAS]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long all clients train at once")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--model", help="model alias or checkpoint folder (default: generated, 8 blocks of hidden 128)")
    parser.add_argument("--modes", nargs="+", default=["ptune", "deep_ptune"], help="client i uses modes[i %% len]")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--client-threads", type=int, default=1, help="torch threads of each client process")
    parser.add_argument("--server-threads", type=int, help="torch threads per server (default: torch's)")
    parser.add_argument("--log-dir", type=Path, help="swarm and client logs (default: a temporary folder, kept)")
    args = parser.parse_args(argv)

    from benchmarks.load_harness import LoadShape, make_load_model, run_load
    from ptune_search.pretrained import resolve_model
    from ptune_search.swarm.launcher import LocalSwarm
    from ptune_search.swarm.server.settings import ServerSettings

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="swarm-load-"))
    path = resolve_model(args.model) if args.model else make_load_model(log_dir)
    shape = LoadShape(
        clients=args.clients,
        duration_s=args.minutes * 60,
        modes=tuple(args.modes),
        batch=args.batch,
        length=args.length,
        pre_seq_len=args.pre_seq_len,
        client_threads=args.client_threads,
    )
    load_before = os.getloadavg()[0]
    settings = ServerSettings(num_threads=args.server_threads)
    with LocalSwarm(path, servers=args.servers, settings=settings, log_dir=log_dir / "swarm") as swarm:
        report = run_load(path, swarm, shape, work_dir=log_dir / "clients")
    for record in report.server_records():
        emit({"benchmark": "swarm_load_server", **record})
    for record in report.client_records():
        emit({"benchmark": "swarm_load_client", **record})
    summary = report.summary()
    emit(
        {
            "benchmark": "swarm_load_summary",
            "model": path.name,
            "servers": args.servers,
            "minutes": args.minutes,
            "batch": args.batch,
            "length": args.length,
            "pre_seq_len": args.pre_seq_len,
            **summary,
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "logs": str(log_dir),
        }
    )
    failed = summary["client_exceptions"] or summary["clients_without_progress"] or summary["failed_calls"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
