"""Tensors on the wire: raw little-endian buffers in hivemind's ``runtime_pb2.Tensor``, unary or streamed.

A request or response is a list of tensors plus msgpack metadata. Payloads up to ``stream_threshold`` bytes
travel in one unary message; larger ones as a stream of ``ExpertRequest``/``ExpertResponse`` messages whose
tensors are cut into parts of ``CHUNK_BYTES``: a tensor's first part carries its dtype, shape and number of
parts, the following parts only bytes. Decoding checks every size against the buffer and a byte limit,
so garbage is a ValueError, never a crash or a huge allocation. A streamed message holds one part, so it
stays under ``protocol.MAX_STREAM_MESSAGE_BYTES``, the most a server reads of one message. A streamed
response says in its first metadata how many messages it has (``messages``): the client closes the stream
once it has them all, which a server waits for (see bounded_streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any, AsyncIterator, Iterable, Iterator, Optional, Sequence

import torch
from hivemind.proto import runtime_pb2

from ptune_search.swarm.protocol import pack_metadata, raise_if_error, unpack_metadata

CHUNK_BYTES = 1024 * 1024
MAX_DIMS = 8
MAX_ELEMENTS = 2**48  # of the shape with its zero sizes counted as 1: beyond it torch's size arithmetic overflows
MIN_PART_BYTES = 4096  # a stream may cut its tensors finer, but carries at most max_bytes / this many parts
WIRE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
NO_COMPRESSION = runtime_pb2.CompressionType.NONE
HALF_WIRE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
"""16-bit dtypes a client may send hidden states in to a server of a wider dtype (``ClientSettings.wire_dtype``).

Rounding to them changes the blocks' inputs by a relative 2**-11 (float16) or 2**-8 (bfloat16) at most, so
outputs and grads differ from float32 by about that much times the blocks' amplification: on the tiny test
model (values of order 1) at most 3.3e-3 (float16) and 2.4e-2 (bfloat16), tested against 1e-2 and 8e-2
(tests/swarm/test_half_wire.py). float16 keeps more digits but overflows beyond 65504.
"""


class PayloadTooLarge(ValueError):
    pass


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def serialize_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    if dtype_name(tensor.dtype) not in WIRE_DTYPES:
        raise TypeError(f"cannot send a {tensor.dtype} tensor; supported: {sorted(WIRE_DTYPES)}")
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return runtime_pb2.Tensor(
        buffer=raw.numpy().tobytes(),
        size=list(tensor.shape),
        dtype=dtype_name(tensor.dtype),
        compression=NO_COMPRESSION,
        chunks=1,
    )


def deserialize_tensor(message: runtime_pb2.Tensor) -> torch.Tensor:
    """Rebuild a tensor, checking dtype, compression, rank and that the buffer has exactly the bytes it claims."""
    if message.compression != NO_COMPRESSION:
        raise ValueError("compressed tensors are not accepted: send compression NONE")
    dtype = WIRE_DTYPES.get(message.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {message.dtype[:40]!r}; supported: {sorted(WIRE_DTYPES)}")
    shape = tuple(int(size) for size in message.size)
    if len(shape) > MAX_DIMS:
        raise ValueError(f"a tensor of {len(shape)} dimensions is not accepted (at most {MAX_DIMS})")
    if math.prod(max(size, 1) for size in shape) > MAX_ELEMENTS:
        raise ValueError(f"tensor shape {list(shape)} is too large")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(message.buffer) != expected:
        raise ValueError(
            f"tensor buffer has {len(message.buffer)} bytes but shape {list(shape)} of {message.dtype} needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(message.buffer), dtype=dtype).reshape(shape)


def split_tensor(message: runtime_pb2.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator[runtime_pb2.Tensor]:
    buffer = memoryview(message.buffer)
    num_chunks = max(1, math.ceil(len(buffer) / chunk_bytes))
    yield runtime_pb2.Tensor(
        buffer=buffer[:chunk_bytes].tobytes(),
        size=message.size,
        dtype=message.dtype,
        compression=message.compression,
        chunks=num_chunks,
    )
    for start in range(chunk_bytes, len(buffer), chunk_bytes):
        yield runtime_pb2.Tensor(buffer=buffer[start : start + chunk_bytes].tobytes())


class TensorAssembler:
    """Collects streamed tensor parts into whole tensors, refusing more than ``max_bytes`` in total.

    The number of parts is bounded too (``max_tensors + max_bytes // MIN_PART_BYTES``): empty parts cost no
    bytes but would otherwise pile up without limit.
    """

    def __init__(self, max_bytes: int, max_tensors: int = 16):
        self.max_bytes, self.max_tensors = max_bytes, max_tensors
        self.max_parts = max_tensors + max_bytes // MIN_PART_BYTES
        self.received_bytes = 0
        self.received_parts = 0
        self._done: list[runtime_pb2.Tensor] = []
        self._header: Optional[runtime_pb2.Tensor] = None
        self._parts: list[bytes] = []

    def add(self, part: runtime_pb2.Tensor) -> None:
        self.received_bytes += len(part.buffer)
        self.received_parts += 1
        if self.received_bytes > self.max_bytes:
            raise PayloadTooLarge(
                f"payload exceeds the server's limit of {self.max_bytes} bytes (got at least {self.received_bytes})"
            )
        if self.received_parts > self.max_parts:
            raise PayloadTooLarge(
                f"a payload of at most {self.max_bytes} bytes comes in at most {self.max_parts} parts"
            )
        if part.dtype:  # the first part of a new tensor
            self._finish_current()
            if len(self._done) >= self.max_tensors:
                raise ValueError(f"a request carries at most {self.max_tensors} tensors")
            if not 1 <= part.chunks <= self.max_parts:
                raise ValueError(
                    f"a tensor's first part must say how many parts it has, 1..{self.max_parts} (got {part.chunks})"
                )
            self._header, self._parts = part, [part.buffer]
        else:
            if self._header is None or len(self._parts) >= self._header.chunks:
                raise ValueError("a tensor part arrived that belongs to no tensor (chunk counts do not match)")
            self._parts.append(part.buffer)

    def _finish_current(self) -> None:
        if self._header is None:
            return
        if len(self._parts) != self._header.chunks:
            raise ValueError(f"a tensor announced {self._header.chunks} parts but {len(self._parts)} arrived")
        whole = runtime_pb2.Tensor()
        whole.CopyFrom(self._header)
        whole.buffer = b"".join(self._parts)
        self._done.append(whole)
        self._header, self._parts = None, []

    def tensors(self) -> list[torch.Tensor]:
        self._finish_current()
        return [deserialize_tensor(message) for message in self._done]


def payload_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def request_messages(
    uid: str, tensors: Sequence[runtime_pb2.Tensor], metadata: bytes, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[runtime_pb2.ExpertRequest]:
    first = True
    for tensor in tensors:
        for part in split_tensor(tensor, chunk_bytes):
            yield runtime_pb2.ExpertRequest(
                uid=uid if first else "", tensors=[part], metadata=metadata if first else b""
            )
            first = False
    if first:  # no tensors at all
        yield runtime_pb2.ExpertRequest(uid=uid, metadata=metadata)


def response_messages(
    tensors: Sequence[torch.Tensor], metadata: dict[str, Any], chunk_bytes: int = CHUNK_BYTES
) -> list[runtime_pb2.ExpertResponse]:
    """A streamed response; its first message's metadata is ``metadata`` plus the number of ``messages``."""
    parts = [part for tensor in tensors for part in split_tensor(serialize_tensor(tensor), chunk_bytes)]
    packed = pack_metadata({**metadata, "messages": max(1, len(parts))})
    if not parts:
        return [runtime_pb2.ExpertResponse(metadata=packed)]
    return [
        runtime_pb2.ExpertResponse(tensors=[part], metadata=packed if index == 0 else b"")
        for index, part in enumerate(parts)
    ]


async def _aiter(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def call_server(
    stub: Any,
    method: str,
    uid: str,
    tensors: Sequence[torch.Tensor],
    metadata: dict[str, Any],
    *,
    timeout: float,
    max_response_bytes: int = 2**31,
    stream_threshold: int,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Call ``rpc_<method>`` (unary) or ``rpc_<method>_stream`` (large payloads) on a block server.

    Returns the response's tensors and metadata; raises :class:`RequestRefused` if the server refused.
    """
    serialized = [serialize_tensor(t) for t in tensors]
    packed = pack_metadata(metadata)
    size = sum(len(t.buffer) for t in serialized)
    if size <= stream_threshold:
        response = await getattr(stub, f"rpc_{method}")(
            runtime_pb2.ExpertRequest(uid=uid, tensors=serialized, metadata=packed), timeout=timeout
        )
        response_metadata = unpack_metadata(response.metadata)
        raise_if_error(response_metadata)
        return [deserialize_tensor(t) for t in response.tensors], response_metadata

    async def exchange() -> tuple[list[torch.Tensor], dict[str, Any]]:
        responses = await getattr(stub, f"rpc_{method}_stream")(_aiter(request_messages(uid, serialized, packed)))
        assembler = TensorAssembler(max_response_bytes)
        response_metadata, received = None, 0
        async with contextlib.aclosing(responses):  # leaving closes the stream: first, as the server expects
            async for message in responses:
                if response_metadata is None:
                    response_metadata = unpack_metadata(message.metadata)
                    raise_if_error(response_metadata)
                for part in message.tensors:
                    assembler.add(part)
                received += 1
                if received == response_metadata.get("messages"):
                    break
        if response_metadata is None:
            raise ConnectionError(f"the server closed the {method} stream without a response")
        return assembler.tensors(), response_metadata

    return await asyncio.wait_for(exchange(), timeout=timeout)
