"""Where one host's cores go while trial-like clients train on a local swarm, against one local process.

Clients (``benchmarks.swarm_step.throughput``: batch 8, 64 tokens, ``ptune``) train at once on a swarm of
``--servers`` block servers; every 0.5 s this process reads the CPU time of each process it started (block
servers, their threads, p2p daemons, the bootstrap peer, the clients) from /proc. The figures cover the clients'
measured window only (model loading is left out). Beside it, in this process, the same training step with
local blocks on all cores: its CPU time per token is the cost of the block compute itself.

Prints one JSON line per client count and a summary::

    {"benchmark": "core_use", "servers": 2, "clients": 2, "tokens_per_s": 196.2, "core_s_by_role": {...},
     "idle_share": 0.11, "server_cpu_ms_per_token": 8.7, "busiest_server_threads": [...], ...}
    {"benchmark": "core_use_local", "tokens_per_s": 249.0, "cpu_ms_per_token": 8.0, "torch_threads": 2}

Run from the repository root: ``python -m benchmarks.core_use [--servers 2] [--clients 1 2 4] [--steps 12]``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import psutil
import torch

from benchmarks.load_harness.runner import info_growth, server_infos
from benchmarks.swarm_step import BATCH, LENGTH, TimedTraining, build_model, make_batch, throughput
from ptune_search.pretrained import resolve_model
from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.server.fair_queue import MergeLimits
from ptune_search.swarm.server.settings import ServerSettings

SAMPLE_PERIOD_S = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def role_of(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())
    if "p2pd" in command:
        return "p2pd"
    if " serve " in command:
        return "server"
    if " dht " in command:
        return "bootstrap"
    return "client" if "multiprocessing" in command else "other"


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (utime + stime from /proc)."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


class CpuSampler(threading.Thread):
    """Samples the CPU time of every descendant of this process, by role (and of each server thread)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, dict[int, tuple[str, float]], dict[tuple[int, int], float]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_PERIOD_S):
            processes, threads = {}, {}
            for process in psutil.Process().children(recursive=True):
                try:
                    role, times = role_of(process), process.cpu_times()
                    processes[process.pid] = (role, times.user + times.system)
                    if role == "server":
                        threads.update({(process.pid, tid): s for tid, s in thread_cpu_s(process.pid).items()})
                except psutil.Error:
                    continue
            self.samples.append((time.perf_counter(), processes, threads))

    def between(self, start: float, end: float) -> tuple[float, dict[str, float], list[float]]:
        """Seconds between the first sample after ``start`` and the last before ``end``, the CPU seconds by
        role, and the CPU seconds of each server thread that used any, largest first."""
        times = [sample[0] for sample in self.samples]
        inside = self.samples[bisect.bisect_left(times, start) : bisect.bisect_right(times, end)]
        if len(inside) < 2:
            raise SystemExit(
                f"the clients trained {end - start:.1f} s, too short to sample every {SAMPLE_PERIOD_S} s: "
                "give more --steps"
            )
        first, last = inside[0], inside[-1]
        by_role: dict[str, float] = {}
        for pid, (role, cpu) in last[1].items():
            if pid in first[1]:
                by_role[role] = by_role.get(role, 0.0) + cpu - first[1][pid][1]
        threads = [cpu - first[2][key] for key, cpu in last[2].items() if key in first[2]]
        return last[0] - first[0], by_role, sorted((t for t in threads if t > 0.05), reverse=True)


def server_counts(before: dict[str, dict], after: dict[str, dict]) -> dict[str, int]:
    """What the servers did between two info snapshots: compute tasks, merged batches and the requests in them,
    and backwards that found their forward's graph kept or had to recompute it."""
    groups = {
        "compute": ("tasks", "merged_batches", "merged_requests"),
        "cache": ("hits", "misses"),
        "backward_passes": ("whole", "partial"),
    }
    counts = {}
    for group, keys in groups.items():
        for key in keys:
            counts[key] = sum(info_growth(before, after, group, key).values())
    return counts


def local_cost(path: Path, steps: int) -> dict:
    """The same step with local blocks on every core: tokens/s and CPU milliseconds per token."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build_model(path, "ptune")
    training = TimedTraining(model, make_batch(0, model.config.vocab_size))
    training.step()
    me = psutil.Process()
    cpu_before, started = sum(me.cpu_times()[:2]), time.perf_counter()
    for _ in range(steps):
        training.step()
    cpu, wall = sum(me.cpu_times()[:2]) - cpu_before, time.perf_counter() - started
    tokens = steps * BATCH * LENGTH
    return {
        "benchmark": "core_use_local",
        "tokens_per_s": round(tokens / wall, 1),
        "cpu_ms_per_token": round(1000 * cpu / tokens, 2),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model alias or checkpoint folder")
    parser.add_argument("--servers", type=int, default=2, help="block servers, the blocks split evenly")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="concurrent client counts")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per client")
    parser.add_argument("--server-threads", type=int, help="torch threads per server (default: share the cores)")
    parser.add_argument("--no-merge", action="store_true", help="servers never merge requests")
    args = parser.parse_args(argv)
    path = resolve_model(args.model)
    merge = MergeLimits(max_tokens=0) if args.no_merge else MergeLimits()
    settings = ServerSettings(num_threads=args.server_threads, merge=merge)
    cores = os.cpu_count() or 1
    sampler = CpuSampler()
    sampler.start()
    with (
        LocalSwarm(path, servers=args.servers, settings=settings, share_cores=not args.server_threads) as swarm,
        SwarmConnection(swarm.initial_peers) as connection,
    ):
        for clients in args.clients:
            before = server_infos(swarm, connection)
            record = throughput(path, swarm.initial_peers, clients, "ptune", args.steps, threads=1)
            counts = server_counts(before, server_infos(swarm, connection))
            window, by_role, threads = sampler.between(*record["window_perf_counter_s"])
            used = sum(by_role.values())
            tokens = record["tokens_per_s"] * window
            emit(
                {
                    "benchmark": "core_use",
                    "servers": args.servers,
                    "clients": clients,
                    "merging": not args.no_merge,
                    "tokens_per_s": record["tokens_per_s"],
                    "window_s": round(window, 1),
                    "core_s_by_role": {role: round(cpu, 2) for role, cpu in sorted(by_role.items())},
                    "idle_share": round(max(0.0, 1 - used / (cores * window)), 3),
                    "server_cpu_ms_per_token": round(1000 * by_role.get("server", 0.0) / tokens, 2),
                    "busiest_server_threads_core_share": [round(cpu / window, 2) for cpu in threads[:4]],
                    "server_tasks": counts["tasks"],  # these count the warm-up steps too
                    "merged_batches": counts["merged_batches"],
                    "requests_in_merged_batches": counts["merged_requests"],
                    "backwards_on_kept_graphs": counts["hits"],
                    "backwards_recomputed": counts["misses"],
                    "backward_passes_whole": counts["whole"],
                    "backward_passes_partial": counts["partial"],
                    "load_avg_1m": record["load_avg_1m"],
                }
            )
    sampler.stop.set()
    emit(local_cost(path, args.steps))


if __name__ == "__main__":
    sys.exit(main())
