"""Helpers shared by the swarm tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ptune_search.models.llama.model import DistributedLlamaConfig, LlamaBlockSpan
from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.client.remote_chain import RemoteBlockChain
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.protocol import BlockService, RequestLimits, unpack_metadata
from ptune_search.swarm.server.settings import ServerSettings

NUM_BLOCKS = 6
HIDDEN = 64
MAX_TOKENS = 512
MAX_PAYLOAD = 3 * 1024 * 1024
SMALL_LIMITS = ServerSettings(limits=RequestLimits(max_tokens=MAX_TOKENS, max_payload_bytes=MAX_PAYLOAD))


def _process_table() -> list[tuple[int, int, int, str, str]]:
    """(pid, ppid, pgid, state, name) of every process, read from /proc."""
    table = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        table.append((int(entry), int(fields[1]), int(fields[2]), fields[0], name))
    return table


def living(predicate: Callable[[tuple[int, int, int, str, str]], bool], wait: float = 10.0) -> list[tuple]:
    """Processes matching ``predicate`` that are still alive (not zombies) after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        found = [p for p in _process_table() if p[3] != "Z" and predicate(p)]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


async def until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    """Return once ``condition()`` holds: tests wait for the state they need, not for a guessed delay."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not true after {timeout}s: {condition}"
        await asyncio.sleep(0.001)


def started_task(release: threading.Event) -> tuple[threading.Event, Callable[[], bool]]:
    """A queue task that blocks the worker until ``release``, and the event that says it has started."""
    started = threading.Event()

    def task() -> bool:
        started.set()
        return release.wait()

    return started, task


def p2pd_children_of_this_process() -> list[tuple]:
    return living(lambda p: p[1] == os.getpid() and p[4].startswith("p2pd"), wait=5.0)


class SwarmRegistry:
    """All swarms started in a scope; stops them and checks that nothing of them survives."""

    def __init__(self) -> None:
        self.swarms: list[LocalSwarm] = []

    def start(self, model: Path, servers: int, replicas: int = 1, **kwargs) -> LocalSwarm:
        swarm = LocalSwarm(model, servers, replicas, **kwargs)
        self.swarms.append(swarm)
        return swarm.start(timeout=180)

    def stop_all(self) -> None:
        groups = set()
        for swarm in self.swarms:
            groups |= {child.pid for child in [swarm.bootstrap, *swarm.servers] if child is not None}
            swarm.stop()
        survivors = living(lambda p: p[2] in groups)
        for pid, *_ in survivors:  # never leave them running, even when failing the test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not survivors, f"processes survived their swarm: {survivors}"


def swarm_config(model: Path, swarm: Optional[LocalSwarm], **overrides) -> DistributedLlamaConfig:
    from transformers import AutoConfig

    initial_peers = swarm.initial_peers if swarm is not None else None
    settings = {"initial_peers": initial_peers, **overrides}
    return DistributedLlamaConfig.from_dict(AutoConfig.from_pretrained(model).to_dict(), **settings)


def server_info(connection: SwarmConnection, peer_id: str) -> dict[str, Any]:
    """What the server ``peer_id`` says about itself (its info RPC: queue, compute, cache ...)."""
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    async def ask() -> dict[str, Any]:
        stub = BlockService.get_stub(connection.p2p, PeerID.from_base58(peer_id))
        return unpack_metadata((await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=30)).metadata)

    return connection.run(ask(), timeout=60)


def copy_trainable(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Give ``target`` the trainable parameters (prompts, head) of ``source``."""
    with torch.no_grad():
        for name, parameter in source.named_parameters():
            if parameter.requires_grad:
                target.get_parameter(name).copy_(parameter)


def classification_batch(
    seed: int, batch: int = 4, length: int = 12, vocab: int = 258, num_labels: int = 3, pad_from: Optional[int] = 7
) -> dict[str, torch.Tensor]:
    """Token ids, a right-padded attention mask (row 1 padded from ``pad_from``) and labels."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if pad_from is not None and batch > 1:
        attention_mask[1, pad_from:] = 0
    labels = torch.randint(0, num_labels, (batch,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def chain_vs_local_blocks(model: Path, config: DistributedLlamaConfig, batch: int, seed: int) -> list[float]:
    """Max abs differences of output, input grad and per-example deep-prompt grad: swarm chain vs local blocks.

    One forward and backward over every block, the last example padded, through a fresh client.
    """
    num_blocks, hidden_size = config.num_hidden_layers, config.hidden_size
    local = LlamaBlockSpan.from_checkpoint(model, config, 0, num_blocks)
    chain = RemoteBlockChain.connect(config)
    try:
        generator = torch.Generator().manual_seed(seed)
        hidden = torch.randn(batch, 9, hidden_size, generator=generator)
        mask = torch.ones(batch, 9, dtype=torch.long)
        mask[-1, 5:] = 0
        prompts = torch.randn(batch, 2 * num_blocks, hidden_size, generator=generator)
        grad_out = torch.randn(batch, 9, hidden_size, generator=generator)
        results = []
        for blocks in (local, chain):
            x, p = hidden.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
            output = blocks(x, mask, p)
            output.backward(grad_out)
            results.append((output.detach(), x.grad, p.grad))
        return [(ours - reference).abs().max().item() for ours, reference in zip(results[1], results[0])]
    finally:
        chain.close()
