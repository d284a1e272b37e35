"""How the fuzzer talks to a block server: the bytes of a case through hivemind, unary or as a stream.

Nothing of a case is re-serialized on the way, so garbage reaches the server exactly as written: unary
requests go through hivemind's unary call as raw bytes, streams through a raw p2p stream in hivemind's
framing (a marker byte, an 8-byte big-endian length, the message; an error marker ends the stream).
Like the swarm's client, the fuzzer closes a stream itself once it has the refusal or all the messages the
response announced (the server waits for that before closing, see ptune_search/swarm/bounded_streams.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any, Optional

import torch
from fuzz_requests import FuzzCase
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.control import P2PHandlerError
from hivemind.proto import runtime_pb2

from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.protocol import BlockService, RequestRefused, raise_if_error, unpack_metadata
from ptune_search.swarm.wire import TensorAssembler


class RawMessage:
    """Bytes that hivemind sends as if they were a serialized protobuf message."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf method hivemind calls
        return self.data


@dataclasses.dataclass
class Outcome:
    refusal: Optional[RequestRefused] = None  # the server's checks refused the request
    handler_error: Optional[str] = None  # hivemind (or the handler) failed with this message
    tensors: list[torch.Tensor] = dataclasses.field(default_factory=list)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    silent: bool = False  # the server closed the stream without a word
    closed_by: str = ""  # how the stream ended, for failure messages
    hung_up: bool = False  # the client left half-way, as the case asked
    seconds: float = 0.0

    def describe(self) -> str:
        if self.refusal is not None:
            return f"refused ({self.refusal})"
        if self.handler_error is not None:
            return f"handler error ({self.handler_error[:200]})"
        if self.silent:
            return f"no response ({self.closed_by})"
        return f"answered {[list(t.shape) for t in self.tensors]} {self.metadata}"


def frame(marker: bytes, data: bytes) -> bytes:
    return marker + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data


END_OF_STREAM = frame(P2P.ERROR_MARKER, b"")


class FuzzClient:
    """Sends :class:`FuzzCase` requests to the server ``peer_id`` over ``connection``."""

    def __init__(self, connection: SwarmConnection, peer_id: PeerID):
        self.connection, self.peer_id = connection, peer_id

    @property
    def p2p(self) -> P2P:
        return self.connection.p2p

    def send(self, case: FuzzCase, timeout: float) -> Outcome:
        """The server's reaction to ``case``; TimeoutError if it takes longer than ``timeout`` seconds."""
        started = time.monotonic()
        outcome = self.connection.run(asyncio.wait_for(self._send(case), timeout), timeout=timeout + 10)
        outcome.seconds = time.monotonic() - started
        return outcome

    async def _send(self, case: FuzzCase) -> Outcome:
        name = BlockService._get_handle_name(None, f"rpc_{case.method}{'_stream' if case.streamed else ''}")
        if not case.streamed:
            try:
                response = await self.p2p.call_protobuf_handler(
                    self.peer_id, name, RawMessage(case.messages[0]), runtime_pb2.ExpertResponse
                )
            except P2PHandlerError as e:
                return Outcome(handler_error=str(e))
            return outcome_of([response])
        return await self._stream(name, case)

    async def open_stream(self, method: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        name = BlockService._get_handle_name(None, f"rpc_{method}_stream")
        _, reader, writer = await self.p2p.call_binary_stream_handler(self.peer_id, name)
        return reader, writer

    async def _stream(self, name: str, case: FuzzCase) -> Outcome:
        reader, writer = await self.open_stream(case.method)
        with contextlib.closing(writer):
            if case.raw_stream is not None:
                data = case.raw_stream
            elif case.hang_up_after is not None:
                writer.write(b"".join(frame(P2P.MESSAGE_MARKER, m) for m in case.messages[: case.hang_up_after]))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                return Outcome(hung_up=True)
            else:
                data = b"".join(frame(P2P.MESSAGE_MARKER, m) for m in case.messages) + END_OF_STREAM
            writer.write(data)
            try:
                await writer.drain()
            except ConnectionError as e:  # the server may refuse and close before reading it all
                closed_by = f"writing failed: {e!r}; "
            else:
                closed_by = ""
            outcome = await read_responses(reader)
            outcome.closed_by = closed_by + outcome.closed_by
            return outcome


async def read_responses(reader: asyncio.StreamReader) -> Outcome:
    """Read a stream's responses until a refusal, all the messages the first one announces, or the stream's end."""
    responses: list[runtime_pb2.ExpertResponse] = []
    closed_by = "the last message"
    while not (responses and _complete(responses)):
        try:
            response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            closed_by = repr(e)[:200]
            break
        if error is not None:
            return Outcome(handler_error=error.message)
        responses.append(response)
    outcome = outcome_of(responses)
    outcome.closed_by = f"reading ended with {closed_by}"
    return outcome


def _complete(responses: list[runtime_pb2.ExpertResponse]) -> bool:
    first = unpack_metadata(responses[0].metadata)
    return "error" in first or len(responses) == first.get("messages")


def outcome_of(responses: list[runtime_pb2.ExpertResponse]) -> Outcome:
    if not responses:
        return Outcome(silent=True)
    metadata = unpack_metadata(responses[0].metadata)
    try:
        raise_if_error(metadata)
    except RequestRefused as e:
        return Outcome(refusal=e, metadata=metadata)
    assembler = TensorAssembler(max_bytes=2**31)
    for response in responses:
        for part in response.tensors:
            assembler.add(part)
    return Outcome(tensors=assembler.tensors(), metadata=metadata)
