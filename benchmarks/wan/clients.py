"""The clients of one client host: threads that each train through the swarm's blocks, sharing one connection.

Run by :mod:`benchmarks.wan_swarm` on a host of its network as ``python -m benchmarks.wan.clients SPEC``
(SPEC: a :class:`ClientHostSpec` as JSON). It joins the swarm, builds ``max_clients`` block chains over one
connection (one p2p daemon for all: 64 clients need not be 64 daemons on 2 cores), takes one warm-up step
on each and prints ``{"ready": true}``. Then each JSON line ``{"clients": k, "seconds": s}`` on stdin runs k
of them at once for s seconds and prints one JSON line: for each client, the start of its first step and the
end of each step (``marks``, monotonic seconds, shared by every namespace), its failed steps, its steps
whose results differ from its first step's (``wrong``) and first errors. A step is what a prompt-tuning
client asks of the swarm: a forward of ``batch x length`` hidden states through every block and the
backward of a loss on the output. End of input ends the process.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from typing import Any

import torch

KEPT_ERRORS = 3


@dataclasses.dataclass(frozen=True)
class ClientHostSpec:
    model: str
    initial_peers: list[str]
    max_clients: int
    batch: int
    length: int
    request_timeout: float
    shared_connection: bool = True  # one p2p daemon and peer id for the host's clients, or one each
    seed: int = 0


class SwarmClient:
    """One client: a block chain of its own and one fixed batch of hidden states."""

    def __init__(self, chain: Any, spec: ClientHostSpec, hidden_size: int, seed: int):
        self.chain = chain
        generator = torch.Generator().manual_seed(seed)
        self.hidden = torch.randn(spec.batch, spec.length, hidden_size, generator=generator)
        self.mask = torch.ones(spec.batch, spec.length, dtype=torch.long)
        self.first_loss: float | None = None
        self.first_grad: float | None = None

    def step(self) -> bool:
        """One step; whether its loss and grad equal the first step's (the blocks are frozen, the batch fixed:
        a lost, garbled or mixed-up answer on the way would show)."""
        hidden = self.hidden.clone().requires_grad_(True)
        loss = self.chain(hidden, self.mask).pow(2).mean()
        loss.backward()
        figures = loss.item(), hidden.grad.norm().item()
        if self.first_loss is None:
            self.first_loss, self.first_grad = figures
        return all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(figures, (self.first_loss, self.first_grad)))

    def train(self, until: float, result: dict[str, Any]) -> None:
        """Steps until ``until``; the step running then finishes and counts (the runner takes its share)."""
        marks, failed, wrong, errors = [time.monotonic()], 0, 0, []
        while time.monotonic() < until:
            try:
                wrong += not self.step()
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                failed += 1
                if len(errors) < KEPT_ERRORS:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            marks.append(time.monotonic())
        result.update(marks=marks, failed=failed, wrong=wrong, errors=errors)


def build_clients(spec: ClientHostSpec) -> list[SwarmClient]:
    from ptune_search.models.distributed import distributed_config
    from ptune_search.models.llama.model import DistributedLlamaModel
    from ptune_search.swarm.client.connection import SwarmConnection
    from ptune_search.swarm.client.remote_chain import RemoteBlockChain
    from ptune_search.swarm.protocol import model_prefix

    settings = {"initial_peers": spec.initial_peers, "request_timeout": spec.request_timeout}
    config = distributed_config(DistributedLlamaModel, spec.model, None, settings)
    prefix = model_prefix(config)
    shared = SwarmConnection(spec.initial_peers) if spec.shared_connection else None
    clients = []
    for seed in range(spec.seed, spec.seed + spec.max_clients):
        connection = shared or SwarmConnection(spec.initial_peers)
        chain = RemoteBlockChain(connection, prefix, config.num_hidden_layers, config)
        clients.append(SwarmClient(chain, spec, config.hidden_size, seed))
    return clients


def run_phase(clients: list[SwarmClient], seconds: float) -> list[dict[str, Any]]:
    until = time.monotonic() + seconds
    results: list[dict[str, Any]] = [{} for _ in clients]
    threads = [threading.Thread(target=c.train, args=(until, r)) for c, r in zip(clients, results)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def main(spec_json: str) -> None:
    torch.set_num_threads(1)
    spec = ClientHostSpec(**json.loads(spec_json))
    clients = build_clients(spec)
    for client in clients:
        client.step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        phase = json.loads(line)
        results = run_phase(clients[: phase["clients"]], phase["seconds"])
        print(json.dumps({"clients": results}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
