"""Resident memory of block servers and their p2p daemons, sampled over a load (Linux: read from /proc).

Example::

    traces = server_memory_traces(swarm)
    for trace in traces:
        trace.sample(elapsed_s=0.0)
    ...
    print([(trace.name, trace.growth_since(10.0), trace.max_mib) for trace in traces])
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ptune_search.swarm.launcher import LocalSwarm

MIB = 1024 * 1024


def rss_bytes(pid: int) -> Optional[int]:
    """Resident set size of ``pid``, or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None  # a zombie has no VmRSS


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclasses.dataclass
class MemoryTrace:
    """RSS samples of one process: ``(seconds since the load started, MiB)``."""

    name: str
    pid: int
    samples: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    def sample(self, elapsed_s: float) -> None:
        rss = rss_bytes(self.pid)
        if rss is not None:
            self.samples.append((round(elapsed_s, 1), round(rss / MIB, 1)))

    def at(self, elapsed_s: float) -> float:
        """MiB of the first sample taken at or after ``elapsed_s`` (the last sample if none was)."""
        return next((mib for when, mib in self.samples if when >= elapsed_s), self.samples[-1][1])

    @property
    def end_mib(self) -> float:
        return self.samples[-1][1]

    @property
    def max_mib(self) -> float:
        return max(mib for _, mib in self.samples)

    def growth_since(self, elapsed_s: float) -> float:
        """How much the RSS level rose from ``elapsed_s`` to the end: the median sample of the last third of that
        span minus the median of its first third. A leak raises the level; the allocator's swings do not: under
        8 clients a server's RSS moves between about 440 and 750 MiB from one second to the next (buffers of
        the batch in flight, memory handed back to the system), so a difference of two single samples, or of
        two minimums, measured the swing (+69/-52 MiB and +203 MiB on runs without a leak)."""
        span = [mib for when, mib in self.samples if when >= elapsed_s] or [self.end_mib]
        third = max(1, len(span) // 3)
        return round(statistics.median(span[-third:]) - statistics.median(span[:third]), 1)

    def series(self, points: int = 11) -> list[tuple[float, float]]:
        """About ``points`` samples spread evenly over the load, first and last included: the trend at a glance."""
        if len(self.samples) <= points:
            return list(self.samples)
        last = len(self.samples) - 1
        return [self.samples[round(i * last / (points - 1))] for i in range(points)]


def server_memory_traces(swarm: "LocalSwarm") -> list[MemoryTrace]:
    """One trace per server process and one per p2p daemon of a server, named after the server."""
    traces = []
    for server in swarm.servers:
        traces.append(MemoryTrace(server.name, server.pid))
        daemons = [pid for pid in child_pids(server.pid) if process_name(pid).startswith("p2pd")]
        traces += [MemoryTrace(f"{server.name}/p2pd", pid) for pid in daemons]
    return traces
