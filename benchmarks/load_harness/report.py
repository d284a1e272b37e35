"""What a load measured: per-client throughput and fairness, swarm retries, client exceptions, server memory."""

from __future__ import annotations

import dataclasses
import statistics
from typing import TYPE_CHECKING, Any

from benchmarks.load_harness.client import ClientResult
from benchmarks.load_harness.memory import MemoryTrace

if TYPE_CHECKING:
    from benchmarks.load_harness.shape import LoadShape

CHAIN_COUNTERS = ("failed_calls", "rerouted_backward_hops", "server_recomputes")  # ChainPasses.stats


@dataclasses.dataclass
class LoadReport:
    """Returned by ``run_load``; ``summary``, ``client_records`` and ``server_records`` give JSON-ready dicts."""

    shape: LoadShape
    clients: list[ClientResult]
    memory: list[MemoryTrace]
    servers_at_start: dict[str, dict[str, Any]]  # server name -> its info RPC (compute, cache) after warm-up
    servers_at_end: dict[str, dict[str, Any]]
    wall_s: float
    client_session: int  # session (and process group) id of the clients: nothing in it may outlive the load

    @property
    def tokens(self) -> int:
        return sum(client.tokens for client in self.clients)

    @property
    def aggregate_tokens_per_s(self) -> float:
        measured = [client for client in self.clients if client.steps]
        if not measured:
            return 0.0
        span = max(c.ended_at for c in measured) - min(c.started_at for c in measured)
        return self.tokens / span if span > 0 else 0.0

    @property
    def fairness(self) -> float:
        """max/min of the clients' tokens/s (1.0: all alike; inf: a client made no progress)."""
        rates = [client.tokens_per_s for client in self.clients]
        return max(rates) / min(rates) if rates and min(rates) > 0 else float("inf")

    @property
    def client_exceptions(self) -> int:
        return sum(client.exceptions for client in self.clients)

    def chain_total(self, name: str) -> int:
        """A swarm-client counter (one of CHAIN_COUNTERS) summed over all clients."""
        return sum(client.chain_stats.get(name, 0) for client in self.clients)

    def median_tokens_per_s(self, mode: str) -> float:
        rates = [client.tokens_per_s for client in self.clients if client.tuning_mode == mode]
        return statistics.median(rates) if rates else 0.0

    def server_growth_mib(self) -> dict[str, float]:
        """The rise of the RSS level of each traced process (servers and their p2p daemons) from the settled start."""
        return {trace.name: trace.growth_since(self.shape.settle_s) for trace in self.memory}

    def summary(self) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "duration_s": self.shape.duration_s,
            "wall_s": round(self.wall_s, 1),
            "steps": sum(client.steps for client in self.clients),
            "tokens": self.tokens,
            "aggregate_tokens_per_s": round(self.aggregate_tokens_per_s, 1),
            "fairness_max_min": round(self.fairness, 3),
            "median_tokens_per_s_by_mode": {m: round(self.median_tokens_per_s(m), 1) for m in self.shape.modes},
            "clients_without_progress": sum(not client.steps for client in self.clients),
            "client_exceptions": self.client_exceptions,
            **{name: self.chain_total(name) for name in CHAIN_COUNTERS},
            "rss_growth_mib": self.server_growth_mib(),
        }

    def client_records(self) -> list[dict[str, Any]]:
        return [
            {
                "client": c.client,
                "mode": c.tuning_mode,
                "steps": c.steps,
                "tokens": c.tokens,
                "elapsed_s": round(c.elapsed_s, 1),
                "tokens_per_s": round(c.tokens_per_s, 1),
                "max_step_s": round(c.max_step_s, 2),
                **c.chain_stats,
                "exceptions": c.exceptions,
                "errors": c.errors,
            }
            for c in self.clients
        ]

    def server_records(self) -> list[dict[str, Any]]:
        """Per server: RSS of its process and p2p daemon, and its compute and cache counters over the load."""
        records = []
        for name, end in self.servers_at_end.items():
            start = self.servers_at_start.get(name, {})
            compute_s = end["compute"]["compute_s"] - start.get("compute", {}).get("compute_s", 0.0)
            record: dict[str, Any] = {"server": name, "blocks": [end["start"], end["end"]]}
            for trace in self.memory:
                if trace.name.split("/")[0] == name:
                    key = "p2pd_rss_mib" if trace.name.endswith("/p2pd") else "rss_mib"
                    record[key] = {
                        "after_warmup": trace.at(0.0),
                        "start": trace.at(self.shape.settle_s),
                        "end": trace.end_mib,
                        "max": trace.max_mib,
                        "growth": trace.growth_since(self.shape.settle_s),
                        "samples": len(trace.samples),
                        "series": trace.series(),
                    }
            record.update(
                tasks=end["compute"]["tasks"] - start.get("compute", {}).get("tasks", 0),
                compute_s=round(compute_s, 1),
                busy_fraction=round(compute_s / self.wall_s, 3) if self.wall_s else None,
                cache_at_end=end["cache"],
            )
            records.append(record)
        return records
