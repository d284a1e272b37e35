"""A client's inference session over the swarm: a session on each server of a route, fed step by step.

The route is found as a forward finds it (:class:`~ptune_search.swarm.client.routing.BlockRouter`), one
:class:`ServerSession` per span: an ``rpc_inference`` stream each way (see ``server/inference.py``) whose
server keeps the span's attention caches. A step sends each server only the new positions' hidden states
(and, while the positions reach into the prompt prefix, that span's deep prompts) and passes its output on.

Each server session remembers the inputs it was sent. When a server fails (it died, timed out, answered
wrongly, refused with anything but ``bad_request``, or refused with ``bad_request`` what another server then
answers, or said the session expired sooner than its timeout), the client bans it as a forward would, opens
sessions for its blocks on other servers and replays those inputs to them in one step, rebuilding their
caches; then the step goes on. The replayed caches hold what the lost one held, so the output does not change
(up to float rounding of a longer step).

Example::

    from ptune_search.models.llama.model import DistributedLlamaForCausalLM

    model = DistributedLlamaForCausalLM.from_pretrained(path, initial_peers=initial_peers)
    chain = model.model.layers  # the RemoteBlockChain: the blocks on the swarm
    hidden = torch.randn(1, 6, model.config.hidden_size)
    session = chain.inference_session(batch_size=1, max_length=32)
    out = session.step(hidden[:, :5], torch.ones(1, 5, dtype=torch.long))  # the first 5 positions
    out = session.step(hidden[:, 5:6], torch.ones(1, 1, dtype=torch.long))  # one more
    session.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Optional

import torch
from hivemind.proto import runtime_pb2

from ptune_search.swarm.client.chain_passes import ChainPasses
from ptune_search.swarm.client.response_checks import check_outputs
from ptune_search.swarm.client.routing import BlockRouter, RemoteSpan
from ptune_search.swarm.protocol import (
    BlockService,
    ErrorKind,
    RequestRefused,
    pack_metadata,
    raise_if_error,
    span_uid,
    unpack_metadata,
)
from ptune_search.swarm.wire import (
    HALF_WIRE_DTYPES,
    WIRE_DTYPES,
    TensorAssembler,
    serialize_tensor,
    split_tensor,
)

if TYPE_CHECKING:
    from hivemind.p2p import P2P

    from ptune_search.swarm.client.connection import SwarmConnection

PROBE_PERIOD = 1.0  # seconds a step's answer may be late before the server is checked to be alive
CLOSE_WAIT_S = 2.0  # a closing session waits this long at most for each server to end its side


class ServerSession:
    """One server's part of a session: blocks ``span.start..span.end-1``, and the inputs sent to them."""

    def __init__(
        self,
        span: RemoteSpan,
        stub: Any,
        outbox: asyncio.Queue,
        responses: AsyncIterator[runtime_pb2.ExpertResponse],
        wire_dtype: torch.dtype,
        timeout: float,
    ):
        self.span, self._outbox, self._responses = span, outbox, responses
        self._stub = stub
        self.wire_dtype, self.timeout = wire_dtype, timeout
        self.position = 0
        self.inputs: list[torch.Tensor] = []  # hidden states of every step so far, for a replay elsewhere
        self.answered_at = time.monotonic()  # opened, or its last step answered

    @classmethod
    async def open(
        cls,
        p2p: "P2P",
        router: BlockRouter,
        span: RemoteSpan,
        opening: dict[str, Any],
        wire_dtype: torch.dtype,
        timeout: float,
    ) -> "ServerSession":
        outbox: asyncio.Queue[Optional[runtime_pb2.ExpertRequest]] = asyncio.Queue()
        metadata: dict[str, Any] = {"open": opening}
        if router.model is not None:
            metadata["model"] = router.model.to_dict()
        uid = span_uid(router.prefix, span.start, span.end)
        outbox.put_nowait(runtime_pb2.ExpertRequest(uid=uid, metadata=pack_metadata(metadata)))
        stub = BlockService.get_stub(p2p, span.peer_id)
        responses = await asyncio.wait_for(stub.rpc_inference(_drained(outbox)), timeout)
        session = cls(span, stub, outbox, responses, wire_dtype, timeout)
        try:
            answer = await asyncio.wait_for(anext(responses, None), timeout)
            if answer is None:
                raise ConnectionError(f"server {span.peer_id} closed the inference session as it opened")
            raise_if_error(unpack_metadata(answer.metadata))
        except BaseException:
            await session.close()
            raise
        return session

    async def step(
        self, hidden: torch.Tensor, step_mask: torch.Tensor, prompts: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The span's output for the new positions ``hidden``; ``prompts``: this span's deep prompts or None."""
        tensors = [hidden.to(self.wire_dtype), step_mask]
        if prompts is not None:
            tensors.append(prompts)
        parts = [part for tensor in tensors for part in split_tensor(serialize_tensor(tensor))]
        metadata = pack_metadata({"messages": len(parts)})
        for index, part in enumerate(parts):
            self._outbox.put_nowait(runtime_pb2.ExpertRequest(tensors=[part], metadata=b"" if index else metadata))
        sent = tensors[0].numel() * tensors[0].element_size()
        (output,) = await self._answer(self._receive(sent))
        check_outputs(str(self.span.peer_id), "inference step", [output], [tensors[0]])
        self.inputs.append(hidden)
        self.position += hidden.shape[1]
        self.answered_at = time.monotonic()
        return output.to(hidden.dtype)

    async def _answer(self, receiving: Awaitable[list[torch.Tensor]]) -> list[torch.Tensor]:
        """The step's answer, within ``timeout``. While it is late, the server is asked for its ``info`` every
        ``PROBE_PERIOD`` seconds: a server that died may leave the session's stream silent rather than broken,
        and the probe's dial fails at once. A slow probe is no failure: only the deadline is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        answer = asyncio.ensure_future(receiving)
        probe: Optional[asyncio.Future] = None
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"server {self.span.peer_id} did not answer a step within {self.timeout:g} s")
                waiting = {answer} if probe is None else {answer, probe}
                wait = left if probe is not None else min(PROBE_PERIOD, left)
                done, _ = await asyncio.wait(waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if answer in done:
                    return answer.result()
                if probe is not None and probe in done:
                    probe.result()  # raises if the server could not be reached
                    probe = None
                elif probe is None:
                    request = runtime_pb2.ExpertRequest()
                    probe = asyncio.ensure_future(self._stub.rpc_info(request, timeout=left))
        finally:
            for task in (answer, probe):
                if task is not None:
                    task.cancel()

    async def _receive(self, max_bytes: int) -> list[torch.Tensor]:
        assembler = TensorAssembler(max_bytes, max_tensors=1)
        expected, received = None, 0
        while expected is None or received < expected:
            message = await anext(self._responses, None)
            if message is None:
                raise ConnectionError(f"server {self.span.peer_id} closed the inference session")
            if expected is None:
                metadata = unpack_metadata(message.metadata)
                raise_if_error(metadata)
                expected = metadata.get("messages", 1)
            for part in message.tensors:
                assembler.add(part)
            received += 1
        return assembler.tensors()

    async def close(self, wait_s: float = 0.0) -> None:
        """End the stream: the server frees the session's cache. With ``wait_s``, wait that long at most for the
        server to end its side, so it sees a close and not a dropped connection (a failed server is not waited
        for)."""
        self._outbox.put_nowait(None)
        with contextlib.suppress(Exception):
            if wait_s > 0:
                async with asyncio.timeout(wait_s):
                    async for _ in self._responses:
                        pass
            await self._responses.aclose()


async def _drained(outbox: asyncio.Queue) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    while (message := await outbox.get()) is not None:
        yield message


class RemoteInferenceSession:
    """Sessions on a route of servers covering all blocks, stepped from synchronous code."""

    def __init__(
        self,
        connection: "SwarmConnection",
        router: BlockRouter,
        passes: ChainPasses,
        batch_size: int,
        max_length: int,
        pre_seq_len: int = 0,
    ):
        if not 0 <= pre_seq_len < max_length:
            raise ValueError(f"pre_seq_len {pre_seq_len} must be below the session's max_length {max_length}")
        self.connection, self.router, self.passes = connection, router, passes
        self.settings = passes.settings
        self.batch_size, self.max_length, self.pre_seq_len = batch_size, max_length, pre_seq_len
        self.position = 0
        self.servers: list[ServerSession] = []  # in block order
        self._masks: list[torch.Tensor] = []  # step masks so far
        self._prompts: Optional[torch.Tensor] = None  # all blocks' deep prompts, kept for replays
        self._lost_inputs: dict[int, list[torch.Tensor]] = {}  # block -> inputs a new session there must replay
        self.replays = 0

    @property
    def route(self) -> list[tuple[str, int, int]]:
        """(peer id, start, end) of the servers the session runs on now."""
        return [(s.span.peer_id.to_base58(), s.span.start, s.span.end) for s in self.servers]

    def step(
        self, hidden: torch.Tensor, step_mask: torch.Tensor, deep_prompts: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The last block's output for the new positions ``hidden`` ``[B, t, H]`` (``step_mask`` ``[B, t]``)."""
        batch, length, _ = hidden.shape
        if batch != self.batch_size or tuple(step_mask.shape) != (batch, length):
            raise ValueError(
                f"a step of the session needs hidden [{self.batch_size}, t, H] and step_mask [{self.batch_size}, t], "
                f"got {list(hidden.shape)} and {list(step_mask.shape)}"
            )
        if self.position + length > self.max_length:
            raise ValueError(
                f"{length} positions after {self.position} exceed the session's max_length {self.max_length}"
            )
        if deep_prompts is not None and self.position < self.pre_seq_len:
            self._prompts = _shared_rows(deep_prompts)
        mask = step_mask.detach().to(torch.long).cpu()
        output = self.connection.run(self._step(hidden.detach(), mask))
        self.position += length
        return output

    def close(self) -> None:
        if self.connection.alive:
            self.connection.run(self._close())

    def __enter__(self) -> "RemoteInferenceSession":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    async def _step(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._masks.append(mask)
        block, index, failures, refusers = 0, 0, 0, []
        while block < self.router.num_blocks:
            if index == len(self.servers) or self.servers[index].span.start != block:
                end = self.servers[index].span.start if index < len(self.servers) else self.router.num_blocks
                span = await self.router.choose_span(block, end)
                try:
                    self.servers.insert(index, await self._open(span, end))
                except Exception as e:
                    failures = await self._on_error(span, failures, e, refusers)
                continue
            server = self.servers[index]
            try:
                output = await server.step(hidden, mask, self._span_prompts(server.span, server.position))
            except Exception as e:
                del self.servers[index]
                self._lost_inputs[block] = server.inputs
                await server.close()
                if self._really_expired(server, e):
                    raise RequestRefused(e.kind, f"server {server.span.peer_id}: {e.message}") from None
                failures = await self._on_error(server.span, failures, e, refusers)
                continue
            self.passes.on_answer(server.span, refusers)
            hidden, block, index, failures, refusers = output, server.span.end, index + 1, 0, []
        return hidden

    async def _open(self, span: RemoteSpan, end: int) -> ServerSession:
        """A session on ``span``'s server, its cache rebuilt from the inputs that the session it replaces was
        given (if any); the replay's output is what a new session after ``span`` (up to ``end``) replays."""
        opening = {
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "pre_seq_len": self.pre_seq_len,
            "timeout": float(self.settings.session_timeout),
        }
        server = await ServerSession.open(
            self.passes.p2p, self.router, span, opening, self._wire_dtype(span), self.settings.request_timeout
        )
        lost = self._lost_inputs.pop(span.start, [])
        if not lost:
            return server
        try:
            mask = torch.cat(self._masks[:-1], dim=1)
            output = await server.step(torch.cat(lost, dim=1), mask, self._span_prompts(span, 0))
        except BaseException:
            self._lost_inputs[span.start] = lost
            await server.close()
            raise
        self.replays += 1
        if span.end < end:
            self._lost_inputs[span.end] = [output]
        return server

    async def _on_error(self, span: RemoteSpan, failures: int, error: Exception, refusers: list) -> int:
        """Back off when the server is busy, else ban it and count the failure, as a forward does (raises
        when a second server refuses the request as bad or the retries are spent)."""
        if isinstance(error, RequestRefused) and error.kind == ErrorKind.BUSY:
            await self.passes.on_busy("inference", span, error)
            return failures
        return await self.passes.on_failure("inference", span, failures, error, refusers)

    def _really_expired(self, server: ServerSession, error: Exception) -> bool:
        """The server says the session expired, and the client did leave it idle that long: the client's own
        doing, raised. A server that claims it sooner is failing (or lying), and is replaced like one."""
        if not (isinstance(error, RequestRefused) and error.kind == ErrorKind.SESSION_EXPIRED):
            return False
        return time.monotonic() - server.answered_at >= self.settings.session_timeout

    def _span_prompts(self, span: RemoteSpan, position: int) -> Optional[torch.Tensor]:
        if self._prompts is None or position >= self.pre_seq_len:
            return None
        return self._prompts[:, span.start * self.pre_seq_len : span.end * self.pre_seq_len]

    def _wire_dtype(self, span: RemoteSpan) -> torch.dtype:
        if self.settings.wire_dtype is not None:
            return HALF_WIRE_DTYPES[self.settings.wire_dtype]
        return WIRE_DTYPES.get(span.record.dtype, torch.float32)

    async def _close(self) -> None:
        servers, self.servers = self.servers, []
        await asyncio.gather(*(server.close(wait_s=CLOSE_WAIT_S) for server in servers))


def _shared_rows(deep_prompts: torch.Tensor) -> torch.Tensor:
    """Deep prompts as sent: one row when they are the same for the whole batch (an expanded view)."""
    deep_prompts = deep_prompts.detach()
    if deep_prompts.shape[0] > 1 and deep_prompts.stride(0) == 0:
        return deep_prompts[:1]
    return deep_prompts
