"""A block server's inference sessions on their own: the rpc_inference handler fed request messages directly."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from hivemind.proto import runtime_pb2
from swarm_testing import NUM_BLOCKS, swarm_config

from ptune_search.models.llama.model import LlamaBlockSpan
from ptune_search.swarm.protocol import RequestLimits, pack_metadata, span_uid, unpack_metadata
from ptune_search.swarm.server.admission import InflightBudget
from ptune_search.swarm.server.checks import ServedSpan
from ptune_search.swarm.server.fair_queue import FairQueue
from ptune_search.swarm.server.inference import InferenceSessions
from ptune_search.swarm.wire import TensorAssembler, serialize_tensor, split_tensor

PREFIX = "tiny-swarm"


@pytest.fixture
def sessions(swarm_model: Path):
    config = swarm_config(swarm_model, None)
    span = LlamaBlockSpan.from_checkpoint(swarm_model, config, 0, NUM_BLOCKS)
    served = ServedSpan(PREFIX, 0, NUM_BLOCKS, config.hidden_size, torch.float32, RequestLimits(session_timeout=0.5))
    queue = FairQueue()
    queue.start()
    try:
        yield InferenceSessions(span, served, queue, InflightBudget(2**30, 2**20))
    finally:
        queue.close()


def opening(batch_size: int, max_length: int, pre_seq_len: int = 0) -> runtime_pb2.ExpertRequest:
    fields = {"batch_size": batch_size, "max_length": max_length, "pre_seq_len": pre_seq_len}
    return runtime_pb2.ExpertRequest(uid=span_uid(PREFIX, 0, NUM_BLOCKS), metadata=pack_metadata({"open": fields}))


def step_messages(*tensors: torch.Tensor, chunk_bytes: int) -> list[runtime_pb2.ExpertRequest]:
    parts = [part for tensor in tensors for part in split_tensor(serialize_tensor(tensor), chunk_bytes)]
    metadata = pack_metadata({"messages": len(parts)})
    return [runtime_pb2.ExpertRequest(tensors=[p], metadata=b"" if i else metadata) for i, p in enumerate(parts)]


async def _requests(messages: list, pause_after: Optional[int]):
    for index, message in enumerate(messages):
        if index == pause_after:
            await asyncio.sleep(3600)  # a client that stops stepping
        yield message


def exchange(sessions: InferenceSessions, messages: list, pause_after: Optional[int] = None) -> list[Any]:
    """The session's answers: metadata maps, and the tensors of each streamed step answer."""

    async def run() -> list[Any]:
        context = types.SimpleNamespace(remote_id="client")
        answers, assembler, left = [], None, 0
        async for message in sessions.serve(_requests(messages, pause_after), context):
            metadata = unpack_metadata(message.metadata) if message.metadata else {}
            if "error" in metadata or "session" in metadata:
                answers.append(metadata)
                continue
            if assembler is None:
                assembler, left = TensorAssembler(2**30), metadata["messages"]
            for part in message.tensors:
                assembler.add(part)
            left -= 1
            if not left:
                answers.append(assembler.tensors()[0])
                assembler = None
        return answers

    return asyncio.run(run())


def test_steps_cut_into_many_messages_equal_the_span_run_at_once(sessions):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 64, generator=generator)
    prompts = torch.randn(1, 2 * NUM_BLOCKS, 64, generator=generator)
    ones = torch.ones(2, 7, dtype=torch.long)
    messages = [opening(2, 12, pre_seq_len=2)]
    messages += step_messages(hidden[:, :5], ones[:, :5], prompts, chunk_bytes=4096)  # 5 + 5 + 3 messages
    messages += step_messages(hidden[:, 5:], ones[:, 5:], chunk_bytes=4096)

    answers = exchange(sessions, messages)

    assert answers[0]["session"]["max_length"] == 12
    expected = sessions.span(hidden, ones, prompts.expand(2, -1, -1))
    assert (torch.cat(answers[1:], dim=1) - expected).abs().max().item() <= 1e-5
    stats = sessions.stats()
    assert stats == {
        "open": 0,
        "reserved_bytes": 0,
        "allocated_bytes": 0,
        "peak_open": 1,
        "peak_reserved_bytes": stats["peak_reserved_bytes"],
        "ended": {"closed": 1},
    }
    assert stats["peak_reserved_bytes"] >= 2 * 12 * 64 * 4  # the cache of 2 x 12 positions, kept as it closed
    assert sessions.budget.bytes == 0


def test_a_session_without_steps_expires_and_frees_its_reservation(sessions):
    answers = exchange(sessions, [opening(1, 8), opening(1, 8)], pause_after=1)

    assert "session" in answers[0] and "expired" in answers[1]["error"]["message"]
    assert sessions.stats()["ended"] == {"expired": 1} and sessions.budget.bytes == 0


def plain_step(batch: int, length: int) -> list[runtime_pb2.ExpertRequest]:
    return step_messages(torch.ones(batch, length, 64), torch.ones(batch, length, dtype=torch.long), chunk_bytes=2**20)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([opening(1, 8, pre_seq_len=8)], "pre_seq_len 8 must be below max_length 8"),
        ([opening(1, 8), *plain_step(1, 9)], "exceed the session's max_length 8"),
        ([opening(1, 8, pre_seq_len=2), *plain_step(1, 3)], "deep prompts of the prefix"),
        ([opening(2, 8), *plain_step(1, 3)], "batch size 2"),
    ],
)
def test_bad_sessions_and_steps_are_refused_and_free_their_reservation(sessions, messages, message):
    answers = exchange(sessions, messages)

    assert message in answers[-1]["error"]["message"] and answers[-1]["error"]["kind"] == "bad_request"
    assert sessions.stats()["open"] == 0 and sessions.budget.bytes == 0
