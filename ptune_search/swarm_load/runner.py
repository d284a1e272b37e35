"""Many prompt-tuning clients on one swarm at once, for a fixed time, with the servers' memory sampled.

:func:`run_load` starts the clients (each its own process, see :mod:`ptune_search.swarm_load.client`),
waits until all have finished their warm-up steps, takes the servers' memory and counters as the start,
lets every client train until one common deadline, samples the servers' RSS meanwhile, and returns a
:class:`LoadReport`. Clients that fail, hang or die are counted in the report, never dropped; whatever
happens, no client process or p2p daemon outlives the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Optional

from ptune_search.swarm_load.client import ClientResult, ClientSpec
from ptune_search.swarm_load.forked_clients import write_specs
from ptune_search.swarm_load.memory import MemoryTrace, server_memory_traces

if TYPE_CHECKING:
    from ptune_search.swarm.connection import SwarmConnection
    from ptune_search.swarm.launcher import LocalSwarm

CHAIN_COUNTERS = ("failed_calls", "rerouted_backward_hops", "server_recomputes")
LOAD_MODEL_HIDDEN, LOAD_MODEL_BLOCKS = 128, 8


def make_load_model(folder: Path) -> Path:
    """The generated Llama the load runs on: 8 blocks of hidden 128, so servers compute rather than only relay."""
    from ptune_search.tiny_llama import make_tiny_llama

    return make_tiny_llama(folder / "tiny-load", hidden_size=LOAD_MODEL_HIDDEN, num_layers=LOAD_MODEL_BLOCKS)


@dataclasses.dataclass
class LoadShape:
    """How many clients train for how long, and what each step is. Client ``i`` uses ``modes[i % len(modes)]``."""

    clients: int = 8
    duration_s: float = 600.0
    modes: tuple[str, ...] = ("ptune", "deep_ptune")
    batch: int = 8
    length: int = 64
    pre_seq_len: int = 16
    num_labels: int = 5
    warmup_steps: int = 2
    client_threads: int = 1
    sample_period_s: float = 1.0
    # The servers' RSS baseline is taken this long into the load: by then every client has had requests in
    # flight at once, so the working set of that concurrency (forward graphs kept for 8 backwards, buffers) is
    # in the baseline, and growth after it means memory that the load keeps taking.
    settle_s: float = 10.0
    ready_timeout_s: float = 600.0  # for all clients to start, join the swarm and finish their warm-up
    finish_timeout_s: float = 300.0  # after the deadline, for the steps still running


@dataclasses.dataclass
class LoadReport:
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
        """RSS growth of each traced process (servers and their p2p daemons) from the settled start to the end."""
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
            {"client": c.client, "mode": c.tuning_mode, "steps": c.steps, "tokens": c.tokens,
             "elapsed_s": round(c.elapsed_s, 1), "tokens_per_s": round(c.tokens_per_s, 1),
             "max_step_s": round(c.max_step_s, 2), **c.chain_stats, "exceptions": c.exceptions, "errors": c.errors}
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
                    record[key] = {"after_warmup": trace.at(0.0), "start": trace.at(self.shape.settle_s),
                                   "end": trace.end_mib, "max": trace.max_mib,
                                   "growth": trace.growth_since(self.shape.settle_s), "samples": len(trace.samples),
                                   "series": trace.series()}
            record.update(
                tasks=end["compute"]["tasks"] - start.get("compute", {}).get("tasks", 0),
                compute_s=round(compute_s, 1),
                busy_fraction=round(compute_s / self.wall_s, 3) if self.wall_s else None,
                cache_at_end=end["cache"],
            )
            records.append(record)
        return records


class ClientProcesses:
    """The load clients, forked by one launcher process in a session of its own (see forked_clients).

    On exit the whole session is SIGKILLed: launcher, clients and their p2p daemons, whatever state they are in.
    """

    def __init__(self, model: Path, initial_peers: list[str], shape: LoadShape, work_dir: Path):
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.go_path = work_dir / "go"
        self.go_path.unlink(missing_ok=True)
        go_timeout = shape.ready_timeout_s + 60.0
        self.specs = [self._spec(index, model, initial_peers, shape, go_timeout) for index in range(shape.clients)]
        self.launcher: Optional[subprocess.Popen] = None
        self._log: Optional[IO] = None
        self.errors: dict[int, str] = {}  # client -> why the runner gave up on it

    def _spec(self, index: int, model: Path, peers: list[str], shape: LoadShape, go_timeout: float) -> ClientSpec:
        spec = ClientSpec(
            client=index,
            model=str(model),
            initial_peers=list(peers),
            tuning_mode=shape.modes[index % len(shape.modes)],
            pre_seq_len=shape.pre_seq_len,
            batch=shape.batch,
            length=shape.length,
            num_labels=shape.num_labels,
            warmup_steps=shape.warmup_steps,
            threads=shape.client_threads,
            ready_path=str(self.work_dir / f"client-{index}.ready"),
            go_path=str(self.go_path),
            result_path=str(self.work_dir / f"client-{index}.result.json"),
            log_path=str(self.work_dir / f"client-{index}.log"),
            go_timeout_s=go_timeout,
        )
        for path in (spec.ready_path, spec.result_path):
            Path(path).unlink(missing_ok=True)
        return spec

    def start(self) -> None:
        specs_path = self.work_dir / "clients.json"
        write_specs(specs_path, self.specs)
        self._log = open(self.work_dir / "launcher.log", "wb")
        self.launcher = subprocess.Popen(
            [sys.executable, "-m", "ptune_search.swarm_load", str(specs_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> list[int]:
        """Clients that finished their warm-up within ``timeout`` s (those that did not are noted)."""
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            if all(self._ready(spec) or self._finished(spec) for spec in self.specs):
                break
            time.sleep(0.2)
        ready = [spec.client for spec in self.specs if self._ready(spec) and not self._finished(spec)]
        for spec in self.specs:
            if spec.client not in ready and not self._finished(spec):
                self.errors[spec.client] = f"not ready (warm-up not finished) within {timeout:.0f} s"
        return ready

    def send_deadline(self, deadline: float) -> None:
        staging = self.go_path.with_suffix(".tmp")
        staging.write_text(repr(deadline))
        os.replace(staging, self.go_path)

    def running(self) -> bool:
        return self.launcher is not None and self.launcher.poll() is None

    def kill_if_running(self, reason: str) -> None:
        if not self.running():
            return
        for spec in self.specs:
            if not self._finished(spec):
                self.errors.setdefault(spec.client, reason)
        self._kill()

    def result(self, client: int) -> ClientResult:
        """The client's own report, with what the runner saw added; a client without one counts as failed."""
        spec = self.specs[client]
        try:
            result = ClientResult.from_dict(json.loads(Path(spec.result_path).read_text()))
        except (OSError, ValueError, TypeError):
            result = ClientResult(client, spec.tuning_mode)
            self.errors.setdefault(client, "no result (the launcher ended before the client wrote one)")
        if client in self.errors:
            result.exceptions += 1
            result.errors.append(f"{self.errors[client]}; log {spec.log_path}:\n{self.log_tail(client)}")
        return result

    def log_tail(self, client: int, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(Path(self.specs[client].log_path).read_text(errors="replace").splitlines()[-lines:])
        return ""

    @staticmethod
    def _ready(spec: ClientSpec) -> bool:
        return Path(spec.ready_path).exists()

    @staticmethod
    def _finished(spec: ClientSpec) -> bool:
        return Path(spec.result_path).exists()

    def _kill(self) -> None:
        if self.launcher is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.launcher.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.launcher.wait(30)

    def close(self) -> None:
        self._kill()  # also ends whatever a finished launcher left in its session
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ClientProcesses":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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


def run_load(
    model: str | Path, swarm: "LocalSwarm", shape: Optional[LoadShape] = None, work_dir: Optional[Path] = None
) -> LoadReport:
    """Run ``shape`` (default: 8 clients for 10 minutes) against ``swarm``, whose servers serve ``model``.

    Client logs, specs and results go to ``work_dir`` (default: ``<swarm log dir>/load-clients``).
    """
    from ptune_search.swarm.connection import SwarmConnection

    shape = shape or LoadShape()
    work_dir = Path(work_dir or swarm.log_dir / "load-clients")
    with ClientProcesses(Path(model), swarm.initial_peers, shape, work_dir) as clients, \
            SwarmConnection(swarm.initial_peers) as connection:
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
