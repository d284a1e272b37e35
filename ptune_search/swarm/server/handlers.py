"""The RPCs of one block server: decode, check, queue fairly, compute on the span, reply.

Requests for the same blocks that wait in the queue at the same time run as one batch (see merged_pass and
FairQueue). Forward with ``keep`` stores the span's autograd graph in the :class:`ActivationCache`; the
backward that follows (same client, same request id) runs the backward on it, or recomputes the forward from
the inputs it carries when the graph is gone. Refusals go back as ``{"error": ...}`` metadata, never as a
crash.

Every request holds a ticket of the server's :class:`InflightBudget` (bytes and tokens in flight, kept graphs
counted) from its first byte to its answer; beyond the budget it is refused as ``busy`` (see admission).

A streamed request must arrive whole within ``limits.receive_timeout`` seconds: a client that stops sending
half-way is refused then, and what it sent is freed (``info`` counts the streams being received).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any, AsyncIterator, Hashable, Optional, Sequence

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from ptune_search.models.decoder_span import DecoderBlockSpan
from ptune_search.swarm.protocol import ErrorKind, RequestRefused, error_metadata, pack_metadata
from ptune_search.swarm.server.activation_cache import ActivationCache
from ptune_search.swarm.server.admission import InflightBudget, Ticket
from ptune_search.swarm.server.checks import (
    ServedSpan,
    SpanRequest,
    bad_request,
    check_payload_size,
    decode_tensors,
    parse_span_request,
)
from ptune_search.swarm.server.fair_queue import FairQueue, Mergeable, QueueFull
from ptune_search.swarm.server.inference import InferenceSessions
from ptune_search.swarm.server.merged_pass import MemberForward, MergedForward, SpanFn
from ptune_search.swarm.wire import (
    PayloadTooLarge,
    TensorAssembler,
    payload_bytes,
    response_messages,
    serialize_tensor,
)

logger = logging.getLogger(__name__)

Reply = tuple[list[torch.Tensor], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class _Work:
    request: SpanRequest
    key: Hashable  # (client, request id): where a kept graph is found


class BlockRPCHandlers:
    """Implements :class:`~ptune_search.swarm.protocol.BlockService` for a loaded :class:`DecoderBlockSpan`."""

    def __init__(
        self,
        span: DecoderBlockSpan,
        served: ServedSpan,
        queue: FairQueue,
        cache: ActivationCache,
        budget: InflightBudget,
        info: dict[str, Any],
    ):
        self.span, self.served, self.queue, self.cache, self.info = span, served, queue, cache, info
        self.budget = budget
        self.sessions = InferenceSessions(span, served, queue, budget)
        tensors = list(span.parameters()) + list(span.buffers())
        self._weights = frozenset(t.untyped_storage().data_ptr() for t in tensors)
        self.receiving_streams = 0
        self.backward_passes = {"whole": 0, "partial": 0}

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        cache = {
            "bytes": self.cache.nbytes,
            "entries": len(self.cache),
            "hits": self.cache.hits,
            "misses": self.cache.misses,
            "evictions": self.cache.evictions,
        }
        info = dict(
            self.info,
            queue=self.queue.pending,
            compute=dict(self.queue.stats),
            cache=cache,
            inflight=self.budget.stats(),
            receiving_streams=self.receiving_streams,
            sessions=self.sessions.stats(),
            backward_passes=dict(self.backward_passes),
        )
        return runtime_pb2.ExpertResponse(metadata=pack_metadata(info))

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._unary("forward", request, context)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._unary("backward", request, context)

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._stream("forward", requests, context):
            yield response

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._stream("backward", requests, context):
            yield response

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async with contextlib.aclosing(self.sessions.serve(requests, context)) as responses:  # frees on disconnect
            async for response in responses:
                yield response

    async def _unary(
        self, kind: str, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        with self.budget.ticket() as ticket:
            try:
                check_payload_size(request.tensors, self.served.limits)
                ticket.add(nbytes=2 * sum(len(tensor.buffer) for tensor in request.tensors))  # request and answer
                tensors = decode_tensors(request.tensors)
                outputs, metadata = await self._process(kind, request.uid, tensors, request.metadata, context, ticket)
            except RequestRefused as e:
                return runtime_pb2.ExpertResponse(metadata=error_metadata(e.kind, e.message))
            tensors = [serialize_tensor(t) for t in outputs]
            return runtime_pb2.ExpertResponse(tensors=tensors, metadata=pack_metadata(metadata))

    async def _stream(
        self, kind: str, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        timeout = self.served.limits.receive_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        with self.budget.ticket() as ticket:
            try:
                try:
                    uid, metadata, tensors = await self._receive(requests, deadline, ticket)
                except TimeoutError:
                    raise bad_request(f"the request stream did not arrive whole within {timeout:g} s") from None
                outputs, response_metadata = await self._process(kind, uid, tensors, metadata, context, ticket)
            except RequestRefused as e:
                yield runtime_pb2.ExpertResponse(metadata=error_metadata(e.kind, e.message))
                with contextlib.suppress(Exception):  # read what the client still sends, so its stream can close
                    async with asyncio.timeout_at(deadline):
                        await _drain(requests)
                return
            for message in response_messages(outputs, response_metadata):
                yield message

    async def _receive(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], deadline: float, ticket: Ticket
    ) -> tuple[str, bytes, list[torch.Tensor]]:
        """The uid, metadata and tensors of a request stream, read until ``deadline`` (loop time) at most;
        ``ticket`` grows with every part (BUSY beyond the server's in-flight budget)."""
        assembler = TensorAssembler(self.served.limits.max_payload_bytes)
        uid, metadata = None, b""
        self.receiving_streams += 1
        try:
            async with asyncio.timeout_at(deadline):
                async for message in requests:
                    if uid is None:
                        uid, metadata = message.uid, message.metadata
                    for part in message.tensors:
                        ticket.add(nbytes=2 * len(part.buffer))  # the part, and as much of the answer
                        assembler.add(part)
            return uid or "", metadata, assembler.tensors()
        except PayloadTooLarge as e:
            raise bad_request(str(e)) from None
        except ValueError as e:
            raise bad_request(f"malformed tensor stream: {e}") from None
        finally:
            self.receiving_streams -= 1

    async def _process(
        self,
        kind: str,
        uid: str,
        tensors: Sequence[torch.Tensor],
        metadata: bytes,
        context: P2PContext,
        ticket: Ticket,
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        request = parse_span_request(kind, uid, tensors, metadata, self.served)
        client: Hashable = context.remote_id
        batch, length = request.hidden.shape[:2]
        ticket.add(tokens=batch * length, nbytes=int(batch * length * self.budget.graph_bytes_per_token))
        work = Mergeable(
            key=(kind, request.start, request.end, request.keep_activations),
            rows=batch,
            length=length,
            nbytes=payload_bytes(tensors),
            payload=_Work(request, (client, request.request_id)),
            run_batch=self._forward_batch if kind == "forward" else self._backward_batch,
        )
        try:
            outputs, response = await self.queue.run_mergeable(client, work)
            outputs[0] = outputs[0].to(request.wire_dtype)  # hidden states, or their grads, as they came
        except QueueFull as e:
            raise RequestRefused(ErrorKind.BUSY, str(e)) from None
        except RequestRefused:
            raise
        except Exception as e:
            logger.exception(f"{kind} over blocks {request.start}:{request.end} failed")
            raise RequestRefused(ErrorKind.INTERNAL, f"{kind} failed on the server: {type(e).__name__}: {e}") from None
        return outputs, response

    def _span_fn(self, start: int, end: int) -> SpanFn:
        def run(hidden: torch.Tensor, mask: torch.Tensor, prompts: Optional[torch.Tensor]) -> torch.Tensor:
            return self.span.run(start, end, hidden, mask, prompts)

        return run

    def _merged(self, requests: Sequence[SpanRequest], grad: bool) -> MergedForward:
        start, end = requests[0].start, requests[0].end
        return MergedForward.run(self._span_fn(start, end), requests, end - start, grad=grad, weights=self._weights)

    def _forward_batch(self, batch: Sequence[_Work]) -> list[Reply | BaseException]:
        return _each_alone_on_failure(self._forwards, batch)

    def _backward_batch(self, batch: Sequence[_Work]) -> list[Reply | BaseException]:
        return _each_alone_on_failure(self._backwards, batch)

    def _forwards(self, batch: Sequence[_Work]) -> list[Reply]:
        """One forward of all requests (same blocks, same ``keep``); with ``keep``, each one's graph is cached."""
        keep = batch[0].request.keep_activations
        merged = self._merged([work.request for work in batch], grad=keep)
        if not keep:
            return [([merged.output(member)], {}) for member in range(len(batch))]
        tokens = sum(work.request.hidden.shape[0] * work.request.hidden.shape[1] for work in batch)
        self.budget.graph_bytes_per_token = max(self.budget.graph_bytes_per_token, merged.nbytes / tokens)
        replies: list[Reply] = []
        for member, work in enumerate(batch):
            kept = self.cache.put(work.key, MemberForward(merged, member, merged.member_bytes(member)))
            replies.append(([merged.output(member)], {"kept": kept, "merged": len(batch)}))
        return replies

    def _backwards(self, batch: Sequence[_Work]) -> list[Reply]:
        """Backwards through the graphs kept for them (one pass per merged forward), the lost ones recomputed."""
        replies: list[Optional[Reply]] = [None] * len(batch)
        graphs: dict[int, tuple[MergedForward, list[tuple[int, int]]]] = {}
        lost: list[int] = []
        for index, work in enumerate(batch):
            entry = self.cache.pop(work.key)
            if entry is not None and entry.fits(work.request):
                graphs.setdefault(id(entry.merged), (entry.merged, []))[1].append((index, entry.member))
            else:
                lost.append(index)
        passes = [(merged, members, False) for merged, members in graphs.values()]
        if lost:
            recomputed = self._merged([batch[index].request for index in lost], grad=True)
            passes.append((recomputed, [(index, member) for member, index in enumerate(lost)], True))
        for merged, members, recomputed in passes:
            if len(members) < len(merged):
                self.backward_passes["partial"] += 1
            else:
                self.backward_passes["whole"] += 1
            grad_outputs = [batch[index].request.grad_outputs for index, _ in members]
            grads = merged.backward([member for _, member in members], grad_outputs)
            for (index, _), (grad_inputs, grad_prompts) in zip(members, grads):
                outputs = [grad_inputs] if grad_prompts is None else [grad_inputs, grad_prompts]
                replies[index] = (outputs, {"recomputed": recomputed})
        return [reply for reply in replies if reply is not None]


def _each_alone_on_failure(run, batch: Sequence[_Work]) -> list[Reply | BaseException]:
    """``run(batch)``; if a merged batch fails, each request alone, so that one bad request fails only itself."""
    try:
        return run(batch)
    except Exception as e:
        if len(batch) == 1:
            return [e]
        logger.warning(f"a merged batch of {len(batch)} requests failed ({type(e).__name__}: {e}); running each alone")
    replies: list[Reply | BaseException] = []
    for work in batch:
        try:
            replies.extend(run([work]))
        except Exception as e:
            replies.append(e)
    return replies


async def _drain(requests: AsyncIterator[Any]) -> None:
    async for _ in requests:
        pass
