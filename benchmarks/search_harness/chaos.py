"""A seeded chaos loop against a running search: servers SIGKILLed and replaced, one SIGSTOPped, MLflow down.

:func:`chaos_schedule` draws the events from a seed, so two runs with one seed meet the same faults at the
same offsets; :class:`ChaosLoop` plays them against a :class:`~ptune_search.swarm.launcher.LocalSwarm` whose
spans each have two servers and an :class:`~benchmarks.search_harness.mlflow_server.MlflowServer`. A server
is only killed or stalled while another server of its span is online, so the swarm always holds every block.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import time
from typing import Callable, Literal

from benchmarks.search_harness.mlflow_server import MlflowServer
from ptune_search.swarm.launcher import ChildProcess, LocalSwarm

EventKind = Literal["kill_server", "stall_server", "mlflow_down"]


@dataclasses.dataclass(frozen=True)
class ChaosPlan:
    """Issue 15's defaults: 15 minutes, a server SIGKILLed every 60-120 s, one stalled 20 s, MLflow down 30 s twice."""

    seconds: float = 900.0
    kill_every_s: tuple[float, float] = (60.0, 120.0)
    stall_s: float = 20.0
    mlflow_down_s: float = 30.0
    mlflow_outages: int = 2


@dataclasses.dataclass(frozen=True)
class ChaosEvent:
    at_s: float  # from the start of the loop
    kind: EventKind


def chaos_schedule(plan: ChaosPlan, seed: int) -> list[ChaosEvent]:
    """Kills at seeded intervals, the stall at a seeded time, each MLflow outage in its own part of the run."""
    rng = random.Random(seed)
    events = []
    at = rng.uniform(*plan.kill_every_s)
    while at < plan.seconds:
        events.append(ChaosEvent(at, "kill_server"))
        at += rng.uniform(*plan.kill_every_s)
    events.append(ChaosEvent(rng.uniform(0.1, 0.8) * plan.seconds, "stall_server"))
    part = plan.seconds / plan.mlflow_outages
    for index in range(plan.mlflow_outages):
        events.append(ChaosEvent((index + rng.uniform(0.1, 0.9)) * part - plan.mlflow_down_s / 2, "mlflow_down"))
    return sorted(events, key=lambda event: event.at_s)


@dataclasses.dataclass
class ChaosRecord:
    """What the loop did, with offsets in seconds from its start."""

    kills: list[dict] = dataclasses.field(default_factory=list)  # with when the replacement was online
    stalls: list[dict] = dataclasses.field(default_factory=list)
    mlflow_outages: list[dict] = dataclasses.field(default_factory=list)
    skipped: list[dict] = dataclasses.field(default_factory=list)  # events with no server that could take them


class ChaosLoop:
    """Plays a schedule until it ends or ``stop()`` says so (the search finished), then undoes what lasts:
    a stalled server is continued, a killed MLflow server started again."""

    def __init__(self, swarm: LocalSwarm, mlflow: MlflowServer, plan: ChaosPlan, seed: int):
        self.swarm, self.mlflow, self.plan = swarm, mlflow, plan
        self.events = chaos_schedule(plan, seed)
        self.rng = random.Random(seed + 1)  # which server: independent of when
        self.record = ChaosRecord()
        self._started = 0.0
        self._stalled: list[tuple[float, ChildProcess]] = []  # (continue at, server)
        self._mlflow_back_at = None
        self._joining: list[tuple[ChildProcess, dict]] = []  # replacements not online yet, with their kill's record

    def run(self, stop: Callable[[], bool]) -> ChaosRecord:
        self._started = time.monotonic()
        pending = list(self.events)
        try:
            while not stop() and (pending or self._stalled or self._mlflow_back_at is not None or self._joining):
                now = self._now()
                self._note_online()
                self._undo_due(now)
                while pending and pending[0].at_s <= now:
                    self._play(pending.pop(0))
                time.sleep(0.5)
        finally:
            self._undo_due(float("inf"))
        return self.record

    def _now(self) -> float:
        return time.monotonic() - self._started

    def _play(self, event: ChaosEvent) -> None:
        at = round(self._now(), 1)
        if event.kind == "mlflow_down":
            if self._mlflow_back_at is None:
                self.mlflow.kill()
                self._mlflow_back_at = self._now() + self.plan.mlflow_down_s
                self.record.mlflow_outages.append({"at_s": at, "seconds": self.plan.mlflow_down_s})
            return
        victim = self._victim()
        if victim is None:
            self.record.skipped.append({"at_s": at, "kind": event.kind})
            return
        if event.kind == "stall_server":
            self.swarm.kill_server(self.swarm.servers.index(victim), signal.SIGSTOP)
            self._stalled.append((self._now() + self.plan.stall_s, victim))
            self.record.stalls.append({"at_s": at, "server": victim.name, "seconds": self.plan.stall_s})
            return
        self.swarm.kill_server(self.swarm.servers.index(victim), signal.SIGKILL)
        replacement = self.swarm.start_server(*victim.span)
        kill = {"at_s": at, "server": victim.name, "replacement": replacement.name}
        self.record.kills.append(kill)
        self._joining.append((replacement, kill))

    def _note_online(self) -> None:
        """A replacement is online once it wrote its info file (its peer id): a count of records would still
        see the killed server's record, alive until it expires."""
        for replacement, kill in list(self._joining):
            if replacement.peer_id is not None:
                kill["replacement_online_s"] = round(self._now() - kill["at_s"], 1)
                self._joining.remove((replacement, kill))
            elif not replacement.alive():
                raise RuntimeError(f"{replacement.name} exited while joining:\n{replacement.log_tail()}")

    def _victim(self) -> ChildProcess | None:
        """A server online and running whose span keeps another such server."""
        unavailable = {id(server) for _, server in self._stalled} | {id(server) for server, _ in self._joining}
        running = [s for s in self.swarm.servers if s.alive() and not s.expected_exit and id(s) not in unavailable]
        spare = [s for s in running if sum(other.span == s.span for other in running) >= 2]
        return self.rng.choice(spare) if spare else None

    def _undo_due(self, now: float) -> None:
        for due, server in [item for item in self._stalled if item[0] <= now]:
            self._stalled.remove((due, server))
            self.swarm.kill_server(self.swarm.servers.index(server), signal.SIGCONT)
            server.expected_exit = False  # continued, not dead
        if self._mlflow_back_at is not None and self._mlflow_back_at <= now:
            self._mlflow_back_at = None
            self.mlflow.start()
            outage = self.record.mlflow_outages[-1]
            outage["answered_after_s"] = round(self._now() - outage["at_s"], 1)  # down + a restart's own time
