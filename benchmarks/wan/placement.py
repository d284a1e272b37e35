"""A swarm and its clients placed on the hosts of a :class:`~benchmarks.wan.network.WanNetwork`.

:class:`NamespacedSwarm` is a LocalSwarm whose bootstrap peer runs on host ``bootstrap`` and server ``i`` on
host ``server-i``, each listening on its host's address. :class:`ClientHosts` runs one
:mod:`benchmarks.wan.clients` process on each host ``clients-i`` and drives their phases. Everything started
here is in a session of its own and is SIGKILLed as a group on exit, p2p daemons included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Sequence

from benchmarks.wan.clients import ClientHostSpec
from benchmarks.wan.network import WanNetwork
from ptune_search.swarm.launcher import LocalSwarm

REPOSITORY = Path(__file__).resolve().parents[2]


def server_host(index: int) -> str:
    return f"server-{index}"


def client_host(index: int) -> str:
    return f"clients-{index}"


class NamespacedSwarm(LocalSwarm):
    """A LocalSwarm with each child on its own host of ``network`` (see the module's docstring)."""

    def __init__(self, network: WanNetwork, model: str | Path, servers: int, replicas: int, **kwargs: Any):
        super().__init__(model, servers, replicas, **kwargs)
        self.network = network

    def command(self, name: str, args: Sequence[str]) -> list[str]:
        host = "bootstrap" if name == "bootstrap" else server_host(int(name.split("-")[1]))
        return [*self.network.exec_prefix(host), *super().command(name, args), "--host", self.network.address(host)]


class ClientHosts:
    """One clients process per client host; :meth:`run` runs a number of clients spread over the hosts."""

    def __init__(self, network: WanNetwork, hosts: int, spec: ClientHostSpec, log_dir: Path):
        self.network, self.spec, self.log_dir = network, spec, log_dir
        self.per_host = -(-spec.max_clients // hosts)
        self.processes: list[subprocess.Popen] = []
        self._logs: list[IO] = []
        self.hosts = hosts

    def __enter__(self) -> "ClientHosts":
        try:
            for index in range(self.hosts):
                spec = dataclasses.replace(self.spec, max_clients=self.per_host, seed=index * self.per_host)
                log = open(self.log_dir / f"{client_host(index)}.log", "wb")
                self._logs.append(log)
                command = [sys.executable, "-m", "benchmarks.wan.clients", json.dumps(dataclasses.asdict(spec))]
                self.processes.append(
                    subprocess.Popen(
                        [*self.network.exec_prefix(client_host(index)), *command],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        text=True,
                        start_new_session=True,
                        cwd=REPOSITORY,
                    )
                )
            for index, process in enumerate(self.processes):
                self._answer(index, process)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _answer(self, index: int, process: subprocess.Popen) -> dict[str, Any]:
        line = process.stdout.readline()
        if not line:
            log = (self.log_dir / f"{client_host(index)}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{client_host(index)} ended (exit code {process.poll()}); its log ends:\n{log}")
        return json.loads(line)

    def run(self, clients: int, seconds: float) -> tuple[list[dict[str, Any]], float]:
        """Run ``clients`` clients, spread evenly over the hosts, for ``seconds``; their results and the time
        (monotonic) at which they were told to stop."""
        if clients > self.per_host * self.hosts:
            raise ValueError(f"{clients} clients, but the hosts were started for {self.per_host * self.hosts}")
        counts = [clients // self.hosts + (index < clients % self.hosts) for index in range(self.hosts)]
        busy = [(index, count) for index, count in enumerate(counts) if count]
        until = time.monotonic() + seconds
        for index, count in busy:
            phase = {"clients": count, "seconds": until - time.monotonic()}
            self.processes[index].stdin.write(json.dumps(phase) + "\n")
            self.processes[index].stdin.flush()
        results = [result for index, _ in busy for result in self._answer(index, self.processes[index])["clients"]]
        return results, until

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        for log in self._logs:
            log.close()
        self.processes.clear()
        self._logs.clear()
