"""Stream RPCs whose request messages a server reads only up to a size it chose, in hivemind's framing.

hivemind's own stream handlers read every message whole, however many bytes its length header announces,
before the handler sees it: one message could make a server buffer gigabytes that no request limit ever
checks. A block server registers its stream RPCs here instead. A message announcing more than
``max_message_bytes`` (or garbage framing) ends the request stream with a ValueError that the handler turns
into a refusal; what the client sends after it is read and dropped, never kept. The framing is hivemind's
(a marker byte, an 8-byte big-endian length, a protobuf; an error marker ends the stream), so hivemind's
stubs call these handlers unchanged. As in hivemind, a client that disconnects cancels its handler.

After its last response the server keeps the stream open (up to ``linger`` seconds) until the client closes
it: p2pd can reset a stream that its handler closes right after writing, and the reset destroys the last
message in flight. Clients that know how many responses to expect close first and lose nothing.

Example::

    from hivemind.proto import runtime_pb2

    async def echo(requests, context):  # a handler: request messages in, response messages out
        async for request in requests:
            yield runtime_pb2.ExpertResponse(tensors=request.tensors)

    p2p = await P2P.create()
    await add_bounded_stream_handler(p2p, "Echo.rpc_echo", echo, runtime_pb2.ExpertRequest, max_message_bytes=2**21)
    ...
    await p2p.shutdown()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Callable, Optional, Union

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, P2PContext
from hivemind.proto.p2pd_pb2 import RPCError

logger = logging.getLogger(__name__)

StreamHandler = Callable[[AsyncIterator[Any], P2PContext], AsyncIterator[Message]]
_Item = Union[Message, Exception, None]  # None: the client ended its stream


class MessageTooLarge(ValueError):
    pass


async def add_bounded_stream_handler(
    p2p: P2P,
    name: str,
    handler: StreamHandler,
    request_type: type[Message],
    max_message_bytes: int,
    *,
    send_timeout: float = 60.0,
    linger: float = 5.0,
    max_prefetch: int = 2,
    balanced: bool = False,
) -> None:
    """Serve ``handler(requests, context)`` as ``name``; each response message is sent within ``send_timeout`` s."""

    async def serve(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=info.peer_id)
        inbox: asyncio.Queue[_Item] = asyncio.Queue(max_prefetch)
        with contextlib.closing(writer):
            receiving = asyncio.create_task(_receive(reader, request_type, max_message_bytes, inbox))
            responding = asyncio.create_task(_respond(handler(_requests(inbox), context), writer, send_timeout))
            try:
                await asyncio.wait({receiving, responding}, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():  # all is answered: let the client close first
                    await asyncio.wait({receiving}, timeout=linger)
            finally:  # the client left (or lingered too long): stop the handler, whatever it was doing
                for task in (receiving, responding):
                    task.cancel()
                await asyncio.gather(receiving, responding, return_exceptions=True)

    await p2p.add_binary_stream_handler(name, serve, balanced)


async def _receive(
    reader: asyncio.StreamReader, request_type: type[Message], max_message_bytes: int, inbox: asyncio.Queue[_Item]
) -> None:
    """Put each request (None: the end of the stream) in ``inbox`` until the client closes the connection.

    After garbage, put the error and drop whatever else the client sends.
    """
    try:
        while True:
            await inbox.put(await _read_message(reader, request_type, max_message_bytes))
    except asyncio.IncompleteReadError:
        return
    except ValueError as e:
        await inbox.put(e)
    while await reader.read(64 * 1024):
        pass


async def _read_message(
    reader: asyncio.StreamReader, request_type: type[Message], max_message_bytes: int
) -> Optional[Message]:
    marker = await reader.readexactly(1)
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise ValueError(f"a stream message starts with the unknown marker {marker!r}")
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if length > max_message_bytes:
        raise MessageTooLarge(
            f"a stream message of {length} bytes exceeds the server's limit of {max_message_bytes} bytes"
        )
    body = await reader.readexactly(length)
    if marker == P2P.ERROR_MARKER:  # hivemind clients end a stream with an (empty) error message
        return None
    try:
        return request_type.FromString(body)
    except DecodeError as e:
        raise ValueError(f"a stream message is not a valid {request_type.__name__}: {e}") from None


async def _requests(inbox: asyncio.Queue[_Item]) -> AsyncIterator[Message]:
    while (item := await inbox.get()) is not None:
        if isinstance(item, Exception):
            raise item
        yield item


async def _respond(responses: AsyncIterator[Message], writer: asyncio.StreamWriter, send_timeout: float) -> None:
    async with contextlib.aclosing(responses):
        while True:
            try:
                response = await anext(responses)
            except StopAsyncIteration:
                return
            except Exception as e:  # noqa: BLE001 - a failed handler still answers, as hivemind's do
                logger.warning("stream handler failed", exc_info=True)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(P2P.send_protobuf(RPCError(message=str(e)), writer), send_timeout)
                return
            try:
                await asyncio.wait_for(P2P.send_protobuf(response, writer), send_timeout)
            except Exception:  # noqa: BLE001 - the client left or stopped reading: nobody to answer
                logger.debug("could not send a stream response", exc_info=True)
                return
