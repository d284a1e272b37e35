"""A server bounded as a whole: 16 clients send maximal training steps at once to a server with a small
in-flight budget. The server refuses what does not fit as ``busy``, the clients back off and retry, every step
succeeds with the outputs and grads of local blocks, and the server's peak RSS grows by at most: its in-flight
budget, its cache of kept graphs (``--cache-bytes``, here equal to the budget), what one maximal step alone adds
(measured first in the same run: a request admitted alone may exceed the budget, and the compute's temporaries
are not counted) and one streamed message per client (read before a refusal).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers import AutoConfig

from ptune_search.models.llama.model import LlamaBlockSpan
from ptune_search.swarm.client.chain_passes import ChainPasses
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.client.routing import BlockRouter
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.protocol import RequestLimits
from ptune_search.swarm.server.settings import ServerSettings
from ptune_search.tiny_llama import make_tiny_llama
from tests.swarm.swarm_testing import SwarmRegistry, server_info

PREFIX = "tiny-budget"
NUM_BLOCKS, HIDDEN = 2, 128
CLIENTS, BATCH, LENGTH = 16, 4, 512  # each request at the server's token limit: 2,048 tokens, 1 MiB of hidden states
MIB = 1024 * 1024
BUDGET = 32 * MIB
STREAM_MESSAGE = 2 * MIB  # a streamed part of 1 MiB and its protobuf copy


@pytest.fixture(scope="module")
def budget_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / PREFIX, hidden_size=HIDDEN, num_layers=NUM_BLOCKS)


@pytest.fixture(scope="module")
def swarm(budget_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    registry = SwarmRegistry()
    settings = ServerSettings(
        limits=RequestLimits(max_tokens=BATCH * LENGTH), inflight_bytes=BUDGET, cache_bytes=BUDGET
    )
    try:
        yield registry.start(budget_model, 1, settings=settings, log_dir=tmp_path_factory.mktemp("budget"))
    finally:
        registry.stop_all()


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # its waits: 300 + 900 s, after a swarm's start
def test_sixteen_clients_at_once_stay_within_the_budget_and_every_step_succeeds(budget_model, swarm):
    config = AutoConfig.from_pretrained(budget_model)
    local = LlamaBlockSpan.from_checkpoint(budget_model, config, 0, NUM_BLOCKS)
    generator = torch.Generator().manual_seed(0)
    hidden = [torch.randn(BATCH, LENGTH, HIDDEN, generator=generator) for _ in range(CLIENTS)]
    grad_out = [torch.randn(BATCH, LENGTH, HIDDEN, generator=generator) for _ in range(CLIENTS)]
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    settings = ClientConfig(request_timeout=120.0, backoff_max=2.0)
    server_pid = swarm.servers[0].pid

    with SwarmConnection(swarm.initial_peers) as connection:
        router = BlockRouter(connection.node, PREFIX, NUM_BLOCKS, settings)

        async def warm_up() -> None:  # one step alone: the server's allocator reaches its working size
            passes = ChainPasses(connection.p2p, router, settings)
            _, hops = await passes.forward(hidden[0], mask, None, 0, NUM_BLOCKS, keep=True)
            await passes.backward(grad_out[0], mask, None, hops)

        idle_kib = memory_kib(server_pid, "VmRSS")
        connection.run(warm_up(), timeout=300)
        margin_kib = memory_kib(server_pid, "VmHWM") - idle_kib  # one maximal step alone
        before_kib = memory_kib(server_pid, "VmRSS")

        async def client(index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
            passes = ChainPasses(connection.p2p, router, settings)
            output, hops = await passes.forward(hidden[index], mask, None, 0, NUM_BLOCKS, keep=True)
            grad, _ = await passes.backward(grad_out[index], mask, None, hops)
            return output, grad, passes.stats

        async def all_clients() -> list:
            return await asyncio.gather(*(client(index) for index in range(CLIENTS)))

        results = connection.run(all_clients(), timeout=900)
        peak_kib = memory_kib(server_pid, "VmHWM")
        info = server_info(connection, swarm.servers[0].peer_id)

    for index, (output, grad, stats) in enumerate(results):
        x = hidden[index].clone().requires_grad_(True)
        expected = local(x, mask)
        expected.backward(grad_out[index])
        assert (output - expected.detach()).abs().max() <= 1e-4, f"client {index}: wrong output"
        assert (grad - x.grad).abs().max() <= 1e-4, f"client {index}: wrong grad"
        assert stats["failed_calls"] == 0, (index, stats)
    refusals = sum(stats["busy_refusals"] for _, _, stats in results)
    growth_mib = (peak_kib - before_kib) / 1024
    figures = {
        "clients": CLIENTS,
        "tokens_per_request": BATCH * LENGTH,
        "budget_mib": BUDGET / MIB,
        "server_rss_before_mib": round(before_kib / 1024, 1),
        "server_peak_rss_mib": round(peak_kib / 1024, 1),
        "one_step_alone_mib": round(margin_kib / 1024, 1),
        "growth_mib": round(growth_mib, 1),
        "busy_refusals": refusals,
        "server_inflight": info["inflight"],
    }
    print(json.dumps(figures))
    assert refusals > 0, "the budget never refused anything: the test does not load the server"
    assert info["inflight"]["requests"] == 0 and info["inflight"]["bytes"] == 0, info["inflight"]
    bound_mib = (2 * BUDGET + CLIENTS * STREAM_MESSAGE) / MIB + margin_kib / 1024
    assert growth_mib <= bound_mib, (bound_mib, figures)
