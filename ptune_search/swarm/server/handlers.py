"""The RPCs of one block server: decode, check, queue fairly, compute on the span, reply.

Forward with ``keep`` stores the span's autograd graph in the :class:`ActivationCache`; the backward that
follows (same client, same request id) runs the backward on it, or recomputes the forward from the inputs
it carries when the graph is gone. Refusals go back as ``{"error": ...}`` metadata, never as a crash.

A streamed request must arrive whole within ``limits.receive_timeout`` seconds: a client that stops sending
half-way is refused then, and what it sent is freed (``info`` counts the streams being received).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any, AsyncIterator, Hashable, Optional, Sequence

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from ptune_search.models.llama.blocks import LlamaBlockSpan, run_llama_span
from ptune_search.swarm.protocol import ErrorKind, RequestRefused, error_metadata, pack_metadata
from ptune_search.swarm.server.activation_cache import ActivationCache, CachedForward
from ptune_search.swarm.server.checks import (
    ServedSpan,
    SpanRequest,
    bad_request,
    check_payload_size,
    decode_tensors,
    parse_span_request,
)
from ptune_search.swarm.server.fair_queue import FairQueue, QueueFull
from ptune_search.swarm.wire import PayloadTooLarge, TensorAssembler, response_messages, serialize_tensor

logger = logging.getLogger(__name__)


class BlockRPCHandlers:
    """Implements :class:`~ptune_search.swarm.protocol.BlockService` for a loaded :class:`LlamaBlockSpan`."""

    def __init__(
        self, span: LlamaBlockSpan, served: ServedSpan, queue: FairQueue, cache: ActivationCache, info: dict[str, Any]
    ):
        self.span, self.served, self.queue, self.cache, self.info = span, served, queue, cache, info
        tensors = list(span.parameters()) + list(span.buffers())
        self._weight_storages = frozenset(t.untyped_storage().data_ptr() for t in tensors)
        self.receiving_streams = 0

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        cache = {
            "bytes": self.cache.nbytes,
            "hits": self.cache.hits,
            "misses": self.cache.misses,
            "evictions": self.cache.evictions,
        }
        info = dict(
            self.info,
            queue=self.queue.pending,
            compute=dict(self.queue.stats),
            cache=cache,
            receiving_streams=self.receiving_streams,
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

    async def _unary(
        self, kind: str, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        try:
            check_payload_size(request.tensors, self.served.limits)
            tensors = decode_tensors(request.tensors)
            outputs, metadata = await self._process(kind, request.uid, tensors, request.metadata, context)
        except RequestRefused as e:
            return runtime_pb2.ExpertResponse(metadata=error_metadata(e.kind, e.message))
        tensors = [serialize_tensor(t) for t in outputs]
        return runtime_pb2.ExpertResponse(tensors=tensors, metadata=pack_metadata(metadata))

    async def _stream(
        self, kind: str, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        timeout = self.served.limits.receive_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            try:
                uid, metadata, tensors = await self._receive(requests, deadline)
            except TimeoutError:
                raise bad_request(f"the request stream did not arrive whole within {timeout:g} s") from None
            outputs, response_metadata = await self._process(kind, uid, tensors, metadata, context)
        except RequestRefused as e:
            yield runtime_pb2.ExpertResponse(metadata=error_metadata(e.kind, e.message))
            with contextlib.suppress(Exception):  # read what the client still sends, so its stream can close
                async with asyncio.timeout_at(deadline):
                    await _drain(requests)
            return
        for message in response_messages(outputs, response_metadata):
            yield message

    async def _receive(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], deadline: float
    ) -> tuple[str, bytes, list[torch.Tensor]]:
        """The uid, metadata and tensors of a request stream, read until ``deadline`` (loop time) at most."""
        assembler = TensorAssembler(self.served.limits.max_payload_bytes)
        uid, metadata = None, b""
        self.receiving_streams += 1
        try:
            async with asyncio.timeout_at(deadline):
                async for message in requests:
                    if uid is None:
                        uid, metadata = message.uid, message.metadata
                    for part in message.tensors:
                        assembler.add(part)
            return uid or "", metadata, assembler.tensors()
        except PayloadTooLarge as e:
            raise bad_request(str(e)) from None
        except ValueError as e:
            raise bad_request(f"malformed tensor stream: {e}") from None
        finally:
            self.receiving_streams -= 1

    async def _process(
        self, kind: str, uid: str, tensors: Sequence[torch.Tensor], metadata: bytes, context: P2PContext
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        request = parse_span_request(kind, uid, tensors, metadata, self.served)
        client: Hashable = context.remote_id
        key = (client, request.request_id)
        compute = self._forward if kind == "forward" else self._backward
        try:
            outputs, response = await self.queue.run(client, functools.partial(compute, request, key))
        except QueueFull as e:
            raise RequestRefused(ErrorKind.BUSY, str(e)) from None
        except RequestRefused:
            raise
        except Exception as e:
            logger.exception(f"{kind} over blocks {request.start}:{request.end} failed")
            raise RequestRefused(ErrorKind.INTERNAL, f"{kind} failed on the server: {type(e).__name__}: {e}") from None
        return outputs, response

    def _span_fn(self, request: SpanRequest):
        blocks = self.span.blocks[request.start - self.span.start : request.end - self.span.start]
        mask = request.attention_mask

        def run(hidden: torch.Tensor, prompts: Optional[torch.Tensor]) -> torch.Tensor:
            return run_llama_span(blocks, self.span.rotary_emb, hidden, mask, prompts)

        return run

    def _forward(self, request: SpanRequest, key: Hashable) -> tuple[list[torch.Tensor], dict[str, Any]]:
        run = self._span_fn(request)
        if not request.keep_activations:
            with torch.no_grad():
                return [run(request.hidden, request.prompts)], {}
        entry = CachedForward.run(run, request.hidden, request.prompts, self._weight_storages)
        kept = self.cache.put(key, entry)
        return [entry.outputs.detach()], {"kept": kept}

    def _backward(self, request: SpanRequest, key: Hashable) -> tuple[list[torch.Tensor], dict[str, Any]]:
        entry = self.cache.pop(key)
        recomputed = entry is None or not _matches(entry, request)
        if recomputed:
            entry = CachedForward.run(self._span_fn(request), request.hidden, request.prompts, self._weight_storages)
        grad_inputs, grad_prompts = entry.backward(request.grad_outputs)
        outputs = [grad_inputs] if grad_prompts is None else [grad_inputs, grad_prompts]
        return outputs, {"recomputed": recomputed}


def _matches(entry: CachedForward, request: SpanRequest) -> bool:
    """A cached graph fits a backward request only if it was built from inputs of the same shapes."""
    same_prompts = (entry.prompts is None and request.prompts is None) or (
        entry.prompts is not None and request.prompts is not None and entry.prompts.shape == request.prompts.shape
    )
    return entry.inputs.shape == request.hidden.shape and same_prompts


async def _drain(requests: AsyncIterator[Any]) -> None:
    async for _ in requests:
        pass
