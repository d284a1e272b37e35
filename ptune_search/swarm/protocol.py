"""What servers and clients of the swarm agree on: block uids, server records, request limits, metadata.

Everything that crosses the wire here is a plain msgpack value (dicts of str, int, float, bool, bytes);
nothing is ever unpickled. Both sides import this module and nothing else of each other.

- A block's DHT key is ``<prefix>.<index>``, e.g. ``SmolLM2-135M.7``. Each server stores one record per
  block under its signed subkey (``<peer id>[owner:<key>]``, see signed_records):
  ``{"state": "online", "start": 0, "end": 15, ...}``.
- A request names its blocks as one string of uids joined by spaces (``"m.0 m.1 m.2"``): a span.
- Request metadata is a msgpack map; a response carries ``{"error": {"kind", "message"}}`` when refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import re
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import msgpack
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from ptune_search.swarm.bounded_streams import add_bounded_stream_handler
from ptune_search.swarm.setting_flags import setting

UID_DELIMITER = "."
SPAN_DELIMITER = " "
PROTOCOL_VERSION = "ptune-swarm/1"
MAX_METADATA_BYTES = 64 * 1024
MAX_BLOCK_INDEX = 999_999  # block uids carry at most 6 digits
MAX_STREAM_MESSAGE_BYTES = 2 * 1024 * 1024  # one streamed message: a tensor part (wire.CHUNK_BYTES), uid, metadata
RECORD_DTYPES = frozenset({"float32", "bfloat16", "float16"})
MAX_MODEL_NAME = 128  # characters of a model type or fingerprint in records and requests


class ServerState(str, enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


class ErrorKind(str, enum.Enum):
    """Why a server refused a request; the client retries elsewhere only for the routing kinds."""

    BAD_REQUEST = "bad_request"  # the client's fault: retrying anywhere gives the same answer
    UNKNOWN_BLOCK = "unknown_block"  # this server does not (or no longer) serve a requested block
    BUSY = "busy"  # queue full: try another replica or later
    INTERNAL = "internal"  # the server failed while computing
    SESSION_EXPIRED = "session_expired"  # no step came within the inference session's timeout: its cache is gone


class RequestRefused(Exception):
    """A server refused a request and said why; ``kind`` is an :class:`ErrorKind`."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple:
        """Rebuilt from its fields when copied or pickled (Ray does both to a trial's exception)."""
        return type(self), (self.kind, self.message)

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"


def model_prefix(config: Any) -> str:
    """The DHT prefix of a model: ``config.dht_prefix`` if set, else its checkpoint folder's name.

    Servers and clients both call this, so a client loading ``/models/SmolLM2-135M`` finds servers started
    with ``--model /anywhere/SmolLM2-135M``. Characters other than letters, digits, ``_`` and ``-`` become ``-``.
    """
    prefix = getattr(config, "dht_prefix", None)
    if not prefix:
        name_or_path = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
        prefix = Path(str(name_or_path).rstrip("/")).name
    prefix = re.sub(r"[^A-Za-z0-9_-]", "-", str(prefix))
    if not prefix.strip("-"):
        raise ValueError(
            "cannot derive the model's DHT prefix: the config has no dht_prefix and no checkpoint path; "
            "set config.dht_prefix (the same on servers and clients)"
        )
    return prefix


def block_uid(prefix: str, index: int) -> str:
    return f"{prefix}{UID_DELIMITER}{index}"


def block_uids(prefix: str, start: int, end: int) -> list[str]:
    return [block_uid(prefix, index) for index in range(start, end)]


def parse_block_uid(uid: str) -> tuple[str, int]:
    """``"m.7" -> ("m", 7)``; a ValueError for anything else."""
    prefix, sep, index = uid.rpartition(UID_DELIMITER)
    if not sep or not prefix or not index.isdigit() or len(index) > 6:
        raise ValueError(f"not a block uid: {uid[:80]!r} (expected '<model-prefix>.<block index>')")
    return prefix, int(index)


def span_uid(prefix: str, start: int, end: int) -> str:
    return SPAN_DELIMITER.join(block_uids(prefix, start, end))


def parse_span_uid(uid: str) -> tuple[str, int, int]:
    """``"m.3 m.4 m.5" -> ("m", 3, 6)``: the blocks must be consecutive and of one model."""
    if not uid or len(uid) > 16 * 1024:
        raise ValueError("the request names no blocks (uid is empty or too long)")
    parsed = [parse_block_uid(part) for part in uid.split(SPAN_DELIMITER)]
    prefix, start = parsed[0]
    for offset, (other_prefix, index) in enumerate(parsed):
        if other_prefix != prefix or index != start + offset:
            raise ValueError(f"blocks of a request must be consecutive blocks of one model (got {uid[:200]!r})")
    return prefix, start, start + len(parsed)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """The checkpoint a server serves or a client runs: its family (``config.model_type``) and fingerprint
    (see :mod:`ptune_search.models.fingerprint`). Servers announce it and clients send it with every request,
    so that the two refuse each other when they hold different models under one DHT prefix."""

    model_type: str
    fingerprint: str

    def to_dict(self) -> dict[str, str]:
        return {"model_type": self.model_type, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, value: Any) -> "ServedModel":
        if not isinstance(value, dict) or set(value) != {"model_type", "fingerprint"}:
            raise ValueError("a model must be a map with the keys model_type and fingerprint")
        model_type, fingerprint = value["model_type"], value["fingerprint"]
        if not all(isinstance(v, str) and len(v) <= MAX_MODEL_NAME for v in (model_type, fingerprint)):
            raise ValueError(f"model_type and fingerprint must be strings of at most {MAX_MODEL_NAME} characters")
        return cls(model_type, fingerprint)

    def __str__(self) -> str:
        return f"a {self.model_type} model (fingerprint {self.fingerprint})"


@dataclasses.dataclass(frozen=True)
class ServerRecord:
    """What a server announces about itself under each of its blocks' keys."""

    state: ServerState
    start: int
    end: int
    throughput: float = 0.0  # tokens per second through the whole span, measured at startup
    dtype: str = "float32"
    version: str = PROTOCOL_VERSION
    model: Optional[ServedModel] = None  # None: a server that does not say (then no client refuses it)

    def covers(self, index: int) -> bool:
        return self.start <= index < self.end

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "start": self.start,
            "end": self.end,
            "throughput": float(self.throughput),
            "dtype": self.dtype,
            "version": self.version,
            **({"model": self.model.to_dict()} if self.model is not None else {}),
        }

    @classmethod
    def from_dict(cls, value: Any) -> "ServerRecord":
        """Parse a record found in the DHT; a ValueError for anything malformed (other peers may be buggy)."""
        if not isinstance(value, dict):
            raise ValueError(f"a server record must be a map, got {type(value).__name__}")
        try:
            state = ServerState(value["state"])
            start, end = value["start"], value["end"]
            throughput = value.get("throughput", 0.0)
            dtype, version = value.get("dtype", "float32"), value.get("version", "")
            model = ServedModel.from_dict(value["model"]) if "model" in value else None
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"malformed server record: {e}") from None
        if not (_is_int(start) and _is_int(end) and 0 <= start < end <= MAX_BLOCK_INDEX + 1):
            raise ValueError(f"malformed span in server record: {str(start)[:40]}:{str(end)[:40]}")
        if not (
            isinstance(throughput, (int, float))
            and not isinstance(throughput, bool)
            and math.isfinite(throughput)
            and throughput >= 0
        ):
            raise ValueError(f"malformed throughput in server record: {str(throughput)[:40]}")
        if dtype not in RECORD_DTYPES or not isinstance(version, str):
            raise ValueError(f"malformed dtype or version in server record: {str(dtype)[:40]}, {str(version)[:40]}")
        return cls(state, start, end, float(throughput), dtype, version, model)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one server accepts in one request; requests beyond these are refused, not truncated."""

    max_tokens: int = setting(8192, help="largest batch * length of a request, prompt prefix included")
    max_payload_bytes: int = setting(256 * 1024 * 1024, help="largest request payload accepted")
    max_pre_seq_len: int = setting(1024, help="longest prompt prefix accepted")
    max_queue: int = setting(1024, help="requests of all clients waiting together; beyond it they are refused as busy")
    receive_timeout: float = setting(60.0, help="seconds a streamed request may take to arrive whole")
    session_timeout: float = setting(
        300.0, help="seconds an inference session may wait for its next step (a client may ask less)"
    )

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def pack_metadata(metadata: dict[str, Any]) -> bytes:
    return msgpack.packb(metadata, use_bin_type=True)


def unpack_metadata(data: bytes) -> dict[str, Any]:
    """Decode request or response metadata: a msgpack map with str keys, or a ValueError saying what is wrong."""
    if not data:
        return {}
    if len(data) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata of {len(data)} bytes exceeds the limit of {MAX_METADATA_BYTES} bytes")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types for garbage
        raise ValueError(f"metadata is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"metadata must be a msgpack map, got {type(value).__name__}")
    return value


def metadata_field(metadata: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """``metadata[name]`` checked to be of ``kind`` (``default`` when absent and a default is given)."""
    if name not in metadata:
        if default is None:
            raise ValueError(f"metadata lacks the field {name!r}")
        return default
    value = metadata[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"metadata field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def error_metadata(kind: ErrorKind, message: str) -> bytes:
    return pack_metadata({"error": {"kind": kind.value, "message": message}})


def raise_if_error(metadata: dict[str, Any]) -> None:
    """Turn an error reported in response metadata into :class:`RequestRefused`."""
    error: Optional[dict] = metadata.get("error")
    if error is None:
        return
    try:
        kind = ErrorKind(error.get("kind"))
    except (ValueError, AttributeError):
        kind = ErrorKind.INTERNAL
    message = error.get("message") if isinstance(error, dict) else None
    raise RequestRefused(kind, str(message or "the server refused the request without a reason"))


class BlockService(ServicerBase):
    """The RPCs of a block server, for ``BlockService.get_stub(p2p, peer_id)`` on clients.

    Servers register their implementation with ``BlockService().add_p2p_handlers(p2p, wrapper=impl)``, so
    handler names do not depend on the implementing class. Every response carries msgpack metadata, with an
    ``error`` entry (see :func:`error_metadata`) when the request was refused.
    """

    async def add_p2p_handlers(
        self, p2p: P2P, wrapper: Any = None, *, namespace: Optional[str] = None, balanced: bool = False
    ) -> None:
        """Register the RPCs; request streams are read with a bound on each message (see bounded_streams)."""
        self._collect_rpc_handlers()
        servicer = self if wrapper is None else wrapper
        registrations = []
        for handler in self._rpc_handlers:
            name = self._get_handle_name(namespace, handler.method_name)
            method = getattr(servicer, handler.method_name)
            if handler.stream_input:
                registrations.append(
                    add_bounded_stream_handler(
                        p2p, name, method, handler.request_type, MAX_STREAM_MESSAGE_BYTES, balanced=balanced
                    )
                )
            else:
                registrations.append(
                    p2p.add_protobuf_handler(
                        name, method, handler.request_type, stream_output=handler.stream_output, balanced=balanced
                    )
                )
        await asyncio.gather(*registrations)

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """An inference session: one stream each way for its whole life (see server/inference.py)."""
        raise NotImplementedError
