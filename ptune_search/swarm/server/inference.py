"""Inference sessions on a block server: each keeps its attention caches here while a client generates.

A session is one ``rpc_inference`` stream each way, for its whole life:

- the client opens it with one message naming the blocks (``uid``) and
  ``{"open": {"batch_size", "max_length", "pre_seq_len", "timeout"}, "model": ...}``; the server reserves
  the memory of its :class:`~ptune_search.models.session_cache.SessionCache` (``batch_size x max_length``
  positions, prefix included, times the bytes a position takes in the span's blocks) in the server's
  :class:`InflightBudget`, or refuses the session as ``busy`` when the budget is full (a session alone on
  the server is admitted, like any request alone; ``batch_size x max_length`` is bounded by the token limit
  of a request), and answers ``{"session": {"max_length", "timeout", "bytes"}}``;
- each step is ``[hidden [B, t, H], step_mask [B, t], (deep prompts [B or 1, P * n, H])]``, cut into stream
  messages as wire.py cuts tensors; its first message's metadata ``{"messages": k}`` says how many carry it.
  Only the new positions travel; the deep prompts come with the steps whose positions reach into the
  prompt prefix (positions ``0..P-1``). The answer is the blocks' output for those positions, as a streamed
  response (wire.response_messages), computed on the server's compute thread in fair turn with other work;
- the cache is freed when the client closes its stream, when it disconnects (the handler is cancelled), when
  no step comes within the session's timeout (``expired``), or when a step is refused or fails: every
  refusal is ``{"error": ...}`` metadata and ends the session.

``info`` reports the open sessions, the bytes they reserve, and how sessions ended.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, AsyncIterator, Hashable, Optional

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from ptune_search.models.decoder_span import DecoderBlockSpan
from ptune_search.models.session_cache import SessionCache
from ptune_search.swarm.protocol import ErrorKind, RequestRefused, error_metadata, pack_metadata, unpack_metadata
from ptune_search.swarm.server.admission import InflightBudget
from ptune_search.swarm.server.checks import (
    ServedSpan,
    SessionRequest,
    bad_request,
    parse_session_open,
    parse_session_step,
)
from ptune_search.swarm.server.fair_queue import FairQueue, QueueFull
from ptune_search.swarm.wire import PayloadTooLarge, TensorAssembler, response_messages

logger = logging.getLogger(__name__)


class SessionExpired(RequestRefused):
    """No step came within the session's timeout: the client's own doing, which no other server would answer
    differently, and no lie (see ``RemoteInferenceSession``)."""

    def __init__(self, message: str):
        super().__init__(ErrorKind.SESSION_EXPIRED, message)

    def __reduce__(self) -> tuple:
        return type(self), (self.message,)


class InferenceSessions:
    """Serves ``rpc_inference`` for a span; counts the sessions open and how they ended."""

    def __init__(self, span: DecoderBlockSpan, served: ServedSpan, queue: FairQueue, budget: InflightBudget):
        self.span, self.served, self.queue, self.budget = span, served, queue, budget
        self.open = 0
        self.reserved_bytes = 0
        self.peak_open = 0  # high-water marks: short sessions end between two looks at ``stats``
        self.peak_reserved_bytes = 0
        self.ended: collections.Counter[str] = collections.Counter()
        self._caches: set[SessionCache] = set()
        self._bytes_per_position: Optional[int] = None

    def stats(self) -> dict[str, Any]:
        """Open sessions, the bytes reserved for their caches and those allocated (never more), the most of each
        at once so far, how they ended."""
        allocated = sum(cache.nbytes for cache in list(self._caches))
        return {
            "open": self.open,
            "reserved_bytes": self.reserved_bytes,
            "allocated_bytes": allocated,
            "peak_open": self.peak_open,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "ended": dict(self.ended),
        }

    async def serve(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with self.budget.ticket() as ticket:
            try:
                session = await self._open(requests)
                if session is None:  # the client left before opening
                    return
                reserved = session.batch_size * session.max_length * await self._position_bytes()
                ticket.add(nbytes=reserved)  # busy when the server's budget is full
            except RequestRefused as e:
                yield _error(e)
                return
            cache = SessionCache(session.batch_size, session.max_length)
            self._caches.add(cache)
            self.open += 1
            self.reserved_bytes += reserved
            self.peak_open = max(self.peak_open, self.open)
            self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
            ending = "disconnected"  # unless the client closes, goes idle, or a step is refused
            try:
                answer = {"max_length": session.max_length, "timeout": session.timeout, "bytes": reserved}
                yield runtime_pb2.ExpertResponse(metadata=pack_metadata({"session": answer}))
                while True:
                    try:
                        tensors = await self._receive_step(requests, session.timeout)
                        if tensors is None:
                            ending = "closed"
                            return
                        output = await self._step(session, cache, tensors, context.remote_id)
                    except SessionExpired as e:
                        ending = "expired"
                        yield _error(e)
                        return
                    except RequestRefused as e:
                        ending = "refused"
                        yield _error(e)
                        return
                    for message in response_messages([output], {"position": cache.length}):
                        yield message
            finally:
                cache.free()
                self._caches.discard(cache)
                self.open -= 1
                self.reserved_bytes -= reserved
                self.ended[ending] += 1

    async def _open(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> Optional[SessionRequest]:
        timeout = self.served.limits.receive_timeout
        try:
            async with asyncio.timeout(timeout):
                opening = await anext(requests, None)
        except TimeoutError:
            raise bad_request(f"the session's opening did not arrive within {timeout:g} s") from None
        except ValueError as e:
            raise bad_request(f"malformed session stream: {e}") from None
        return None if opening is None else parse_session_open(opening.uid, opening.metadata, self.served)

    async def _position_bytes(self) -> int:
        """Cache bytes of one row and position over the span, measured once (by a one-token step)."""
        if self._bytes_per_position is None:
            self._bytes_per_position = await self.queue.run("sessions", self.span.cache_bytes_per_position)
        return self._bytes_per_position

    async def _receive_step(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], timeout: float
    ) -> Optional[list[torch.Tensor]]:
        """The tensors of the next step, or None when the client closed its stream; :class:`SessionExpired` if
        the step has not arrived whole within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                return await self._read_step(requests)
        except TimeoutError:
            raise SessionExpired(f"the session expired: no step came within {timeout:g} s") from None

    async def _read_step(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> Optional[list[torch.Tensor]]:
        try:
            first = await anext(requests, None)
            if first is None:
                return None
            assembler = TensorAssembler(self.served.limits.max_payload_bytes)
            count = unpack_metadata(first.metadata).get("messages", 1)
            if not isinstance(count, int) or not 1 <= count <= assembler.max_parts:
                raise ValueError(f"a step's first message must say how many messages carry it (got {count!r})")
            message = first
            for index in range(count):
                if index:
                    message = await anext(requests, None)
                    if message is None:
                        raise ValueError(f"the stream ended after {index} of the step's {count} messages")
                for part in message.tensors:
                    assembler.add(part)
            return assembler.tensors()
        except PayloadTooLarge as e:
            raise bad_request(str(e)) from None
        except ValueError as e:
            raise bad_request(f"malformed step: {e}") from None

    async def _step(
        self, session: SessionRequest, cache: SessionCache, tensors: list[torch.Tensor], client: Hashable
    ) -> torch.Tensor:
        step = parse_session_step(tensors, session, cache.length, self.served)

        def run():
            return self.span.run_step(session.start, session.end, step.hidden, cache, step.step_mask, step.prompts)

        try:
            output = await self.queue.run(client, run)
        except QueueFull as e:
            raise RequestRefused(ErrorKind.BUSY, str(e)) from None
        except Exception as e:
            logger.exception(f"inference step over blocks {session.start}:{session.end} failed")
            raise RequestRefused(ErrorKind.INTERNAL, f"inference step failed: {type(e).__name__}: {e}") from None
        return output.to(step.wire_dtype)


def _error(refusal: RequestRefused) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=error_metadata(refusal.kind, refusal.message))
