"""What the server fuzzer sends: valid requests, one-field mutations of them and garbage, as hypothesis strategies.

A :class:`FuzzCase` is a request as bytes (serialized protobuf messages, so that garbage the protobuf library
would refuse to build can be sent too) together with what the server must do with it: refuse it, or answer
it as local blocks would. Every mutation here makes a valid request invalid: the server must notice.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Callable, Optional

import msgpack
import torch
from hivemind.proto import runtime_pb2
from hypothesis import strategies as st

from ptune_search.swarm.protocol import MAX_METADATA_BYTES, MAX_STREAM_MESSAGE_BYTES, pack_metadata, span_uid
from ptune_search.swarm.wire import CHUNK_BYTES, WIRE_DTYPES, request_messages, serialize_tensor, split_tensor

PREFIX = "tiny-fuzz"
NUM_BLOCKS = 4
HIDDEN = 64
FLOAT_DTYPES = [torch.float64, torch.float16, torch.bfloat16]
INT_DTYPES = [torch.int64, torch.int32, torch.int8, torch.uint8]


class Expect(enum.Enum):
    REFUSAL = "refusal"  # an error response from the server's checks, with a message
    REJECTION = "rejection"  # not even a request: a refusal, or hivemind's error for a message it cannot parse
    ANSWER = "answer"  # the outputs local blocks compute from the same inputs
    ANY = "any"  # the client hangs up half-way: nothing comes back, the server must just cope


@dataclasses.dataclass
class SpanInputs:
    """A valid request, from which local blocks compute the answer the server must give."""

    method: str
    start: int
    end: int
    hidden: torch.Tensor
    mask: torch.Tensor
    prompts: Optional[torch.Tensor]
    grad_outputs: Optional[torch.Tensor]
    metadata: dict[str, Any]

    @property
    def uid(self) -> str:
        return span_uid(PREFIX, self.start, self.end)

    def tensors(self) -> list[torch.Tensor]:
        extra = [self.grad_outputs] if self.method == "backward" else []
        return [self.hidden, self.mask, *extra, *([self.prompts] if self.prompts is not None else [])]


@dataclasses.dataclass
class FuzzCase:
    label: str
    method: str
    streamed: bool
    messages: list[bytes]  # serialized ExpertRequest messages, or garbage
    expect: Expect
    inputs: Optional[SpanInputs] = None  # for Expect.ANSWER
    hang_up_after: Optional[int] = None  # a stream only: send this many messages, then close without ending it
    raw_stream: Optional[bytes] = None  # a stream only: bytes to write as they are, instead of framed messages


def unary(label: str, request: runtime_pb2.ExpertRequest, expect: Expect, inputs=None, method="forward") -> FuzzCase:
    return FuzzCase(label, method, False, [request.SerializeToString()], expect, inputs)


def request_of(uid: str, tensors: list[runtime_pb2.Tensor], metadata: bytes) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=metadata)


def valid_request(inputs: "SpanInputs") -> runtime_pb2.ExpertRequest:
    return request_of(inputs.uid, [serialize_tensor(t) for t in inputs.tensors()], pack_metadata(inputs.metadata))


@st.composite
def span_inputs(draw: st.DrawFn) -> SpanInputs:
    """A valid forward or backward request for a span of the fuzzed server, in all the forms it accepts."""
    method = draw(st.sampled_from(["forward", "backward"]))
    start = draw(st.integers(0, NUM_BLOCKS - 1))
    end = draw(st.integers(start + 1, NUM_BLOCKS))
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    pre_seq_len = draw(st.integers(0, min(3, length)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hidden = torch.randn(batch, length, HIDDEN, generator=generator)
    mask = torch.randint(0, 2, (batch, length), generator=generator).to(draw(st.sampled_from(INT_DTYPES)))
    prompts = None
    if pre_seq_len:
        rows = draw(st.sampled_from(sorted({1, batch})))
        prompts = torch.randn(rows, pre_seq_len * (end - start), HIDDEN, generator=generator)
    grad_outputs = torch.randn(batch, length, HIDDEN, generator=generator) if method == "backward" else None
    metadata: dict[str, Any] = {"request_id": draw(st.text(min_size=1, max_size=128)), "pre_seq_len": pre_seq_len}
    if method == "forward" and draw(st.booleans()):
        metadata["keep"] = draw(st.booleans())
    if draw(st.booleans()):
        metadata["unknown_field"] = draw(PACKABLE_INTS | st.text(max_size=20))
    return SpanInputs(method, start, end, hidden, mask, prompts, grad_outputs, metadata)


@st.composite
def valid_requests(draw: st.DrawFn) -> FuzzCase:
    inputs = draw(span_inputs())
    serialized = [serialize_tensor(t) for t in inputs.tensors()]
    packed = pack_metadata(inputs.metadata)
    if draw(st.booleans()):
        return unary("valid", request_of(inputs.uid, serialized, packed), Expect.ANSWER, inputs, inputs.method)
    chunk = draw(st.sampled_from([64, 1000, 4096, CHUNK_BYTES]))
    messages = [m.SerializeToString() for m in request_messages(inputs.uid, serialized, packed, chunk_bytes=chunk)]
    return FuzzCase("valid streamed", inputs.method, True, messages, Expect.ANSWER, inputs)


def _replace(inputs: SpanInputs, **changes: Any) -> SpanInputs:
    return dataclasses.replace(inputs, **changes)


def _poison(tensor: torch.Tensor, draw: st.DrawFn) -> torch.Tensor:
    poisoned = tensor.clone()
    index = draw(st.integers(0, poisoned.numel() - 1))
    poisoned.view(-1)[index] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return poisoned


def _other_last_dim(tensor: torch.Tensor, draw: st.DrawFn) -> torch.Tensor:
    size = draw(st.integers(1, 2 * HIDDEN).filter(lambda s: s != HIDDEN))
    return torch.zeros(*tensor.shape[:-1], size)


# Each mutation changes one field of a valid request so that it becomes invalid; None if it does not apply.
Mutation = Callable[[SpanInputs, st.DrawFn], Optional[tuple[list[torch.Tensor], dict[str, Any], str]]]


def _tensor_mutation(change: Callable[[SpanInputs, st.DrawFn], Optional[SpanInputs]]) -> Mutation:
    def mutate(inputs: SpanInputs, draw: st.DrawFn):
        changed = change(inputs, draw)
        return None if changed is None else (changed.tensors(), changed.metadata, changed.uid)

    return mutate


def _metadata_mutation(change: Callable[[dict[str, Any], st.DrawFn], dict[str, Any]]) -> Mutation:
    def mutate(inputs: SpanInputs, draw: st.DrawFn):
        return inputs.tensors(), change(dict(inputs.metadata), draw), inputs.uid

    return mutate


def _uid_mutation(make_uid: Callable[[SpanInputs, st.DrawFn], str]) -> Mutation:
    def mutate(inputs: SpanInputs, draw: st.DrawFn):
        return inputs.tensors(), inputs.metadata, make_uid(inputs, draw)

    return mutate


def _drop_tensor(inputs: SpanInputs, draw: st.DrawFn):
    tensors = inputs.tensors()
    del tensors[draw(st.integers(0, len(tensors) - 1))]
    return tensors, inputs.metadata, inputs.uid


def _add_tensor(inputs: SpanInputs, draw: st.DrawFn):
    tensors = inputs.tensors()
    tensors.insert(draw(st.integers(0, len(tensors))), torch.zeros(draw(st.integers(1, 4)), HIDDEN))
    return tensors, inputs.metadata, inputs.uid


def _swap_tensors(inputs: SpanInputs, draw: st.DrawFn):
    tensors = inputs.tensors()
    tensors[0], tensors[1] = tensors[1], tensors[0]
    return tensors, inputs.metadata, inputs.uid


def _with(key: str, values: st.SearchStrategy) -> Callable[[dict[str, Any], st.DrawFn], dict[str, Any]]:
    def change(metadata: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
        return {**metadata, key: draw(values)}

    return change


def _without(key: str) -> Callable[[dict[str, Any], st.DrawFn], dict[str, Any]]:
    return lambda metadata, draw: {k: v for k, v in metadata.items() if k != key}


def _other_pre_seq_len(metadata: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
    current = metadata["pre_seq_len"]
    value = draw(PACKABLE_INTS.filter(lambda v: v != current) | st.sampled_from([-1, 2**40]))
    return {**metadata, "pre_seq_len": value}


PACKABLE_INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
NOT_STR = PACKABLE_INTS | st.binary(max_size=8) | st.none() | st.lists(PACKABLE_INTS, max_size=2) | st.floats()
NOT_INT = st.text(max_size=5) | st.floats() | st.none() | st.booleans() | st.binary(max_size=4)
NOT_BOOL = PACKABLE_INTS | st.text(max_size=5) | st.none() | st.floats()
DIGITLESS = st.characters(exclude_categories=("Nd", "Cs"))  # Cs: surrogates, which no UTF-8 string holds

MUTATIONS: dict[str, Mutation] = {
    "hidden dtype": _tensor_mutation(
        # float16 and bfloat16 hidden states are a client's 16-bit wire option, answered in kind
        lambda i, d: _replace(i, hidden=i.hidden.to(d(st.sampled_from([torch.float64, *INT_DTYPES]))))
    ),
    "hidden size": _tensor_mutation(lambda i, d: _replace(i, hidden=_other_last_dim(i.hidden, d))),
    "hidden rank": _tensor_mutation(
        lambda i, d: _replace(
            i, hidden=d(st.sampled_from([i.hidden.reshape(-1, HIDDEN), i.hidden.unsqueeze(0), i.hidden[..., None]]))
        )
    ),
    "hidden not finite": _tensor_mutation(lambda i, d: _replace(i, hidden=_poison(i.hidden, d))),
    "hidden empty": _tensor_mutation(lambda i, d: _replace(i, hidden=i.hidden[:, :0], mask=i.mask[:, :0])),
    "mask float": _tensor_mutation(
        lambda i, d: _replace(i, mask=i.mask.to(d(st.sampled_from(FLOAT_DTYPES + [torch.float32]))))
    ),
    "mask value": _tensor_mutation(
        lambda i, d: _replace(i, mask=_set_one(i.mask.long(), d(st.sampled_from([2, -1, 255, 7, 2**40])), d))
    ),
    "mask shape": _tensor_mutation(
        lambda i, d: (
            _replace(
                i,
                mask=d(
                    st.sampled_from(
                        [
                            i.mask[:, 1:],
                            torch.cat([i.mask, i.mask[:, :1]], 1),
                            i.mask[None],
                            i.mask.reshape(-1),
                            i.mask.t(),
                        ]
                    )
                ),
            )
            if i.mask.shape[0] != i.mask.shape[1]
            else None
        )
    ),
    "prompts dtype": _tensor_mutation(
        lambda i, d: (
            None
            if i.prompts is None
            else _replace(
                i, prompts=i.prompts.to(d(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int64])))
            )
        )
    ),
    "prompts shape": _tensor_mutation(
        lambda i, d: (
            None
            if i.prompts is None
            else _replace(
                i,
                prompts=d(
                    st.sampled_from(
                        [
                            i.prompts[:, 1:],
                            _other_last_dim(i.prompts, d),
                            i.prompts[0],
                            i.prompts[:1].expand(i.hidden.shape[0] + 1, -1, -1),
                        ]
                    )
                ),
            )
        )
    ),
    "prompts not finite": _tensor_mutation(
        lambda i, d: None if i.prompts is None else _replace(i, prompts=_poison(i.prompts, d))
    ),
    "grad shape": _tensor_mutation(
        lambda i, d: (
            None
            if i.grad_outputs is None
            else _replace(
                i,
                grad_outputs=d(
                    st.sampled_from(
                        [torch.cat([i.grad_outputs] * 2), i.grad_outputs[..., :5], torch.cat([i.grad_outputs] * 2, 1)]
                    )
                ),
            )
        )
    ),
    "grad dtype": _tensor_mutation(
        lambda i, d: (
            None
            if i.grad_outputs is None
            else _replace(i, grad_outputs=i.grad_outputs.to(d(st.sampled_from(FLOAT_DTYPES + INT_DTYPES))))
        )
    ),
    "grad not finite": _tensor_mutation(
        lambda i, d: None if i.grad_outputs is None else _replace(i, grad_outputs=_poison(i.grad_outputs, d))
    ),
    "too many tokens": _tensor_mutation(
        lambda i, d: _replace(
            i,
            hidden=torch.zeros(1, 513, HIDDEN),
            mask=torch.ones(1, 513, dtype=torch.long),
            grad_outputs=None if i.grad_outputs is None else torch.zeros(1, 513, HIDDEN),
        )
    ),
    "tensor dropped": _drop_tensor,
    "tensor added": _add_tensor,
    "tensors swapped": _swap_tensors,
    "pre_seq_len": _metadata_mutation(_other_pre_seq_len),
    "pre_seq_len type": _metadata_mutation(_with("pre_seq_len", NOT_INT)),
    "request_id missing": _metadata_mutation(_without("request_id")),
    "request_id type": _metadata_mutation(_with("request_id", NOT_STR)),
    "request_id length": _metadata_mutation(_with("request_id", st.just("") | st.text(min_size=129, max_size=300))),
    "keep type": _metadata_mutation(_with("keep", NOT_BOOL)),
    "uid of another model": _uid_mutation(
        lambda i, d: span_uid(
            d(st.text(DIGITLESS, min_size=1, max_size=20).filter(lambda p: p != PREFIX and " " not in p)),
            i.start,
            i.end,
        )
    ),
    "uid beyond the blocks": _uid_mutation(
        lambda i, d: span_uid(PREFIX, i.start, d(st.integers(NUM_BLOCKS + 1, NUM_BLOCKS + 50)))
    ),
    "uid not consecutive": _uid_mutation(
        lambda i, d: " ".join(d(st.permutations(i.uid.split(" ") + [f"{PREFIX}.{i.start}"])))
    ),
    "uid text": _uid_mutation(lambda i, d: d(st.text(DIGITLESS, max_size=300))),
    "uid long": _uid_mutation(lambda i, d: " ".join([f"{PREFIX}.{n}" for n in range(d(st.integers(5, 4000)))])),
}


def _set_one(tensor: torch.Tensor, value: int, draw: st.DrawFn) -> torch.Tensor:
    changed = tensor.clone()
    changed.view(-1)[draw(st.integers(0, changed.numel() - 1))] = value
    return changed


@st.composite
def field_mutations(draw: st.DrawFn) -> FuzzCase:
    """A valid request with one field changed so that the server must refuse it."""
    inputs = draw(span_inputs())
    label = draw(st.sampled_from(sorted(MUTATIONS)))
    mutated = MUTATIONS[label](inputs, draw)
    if mutated is None:
        label, mutated = "tensor dropped", _drop_tensor(inputs, draw)
    tensors, metadata, uid = mutated
    packed = msgpack.packb(metadata, use_bin_type=True)
    request = request_of(uid, [serialize_tensor(t) for t in tensors], packed)
    return unary(label, request, Expect.REFUSAL, method=inputs.method)


@st.composite
def wire_mutations(draw: st.DrawFn) -> FuzzCase:
    """A valid request with one serialized tensor damaged: its bytes, dtype name, compression or sizes."""
    inputs = draw(span_inputs())
    serialized = [serialize_tensor(t) for t in inputs.tensors()]
    target = serialized[draw(st.integers(0, len(serialized) - 1))]
    label = draw(
        st.sampled_from(
            [
                "buffer truncated",
                "buffer extended",
                "dtype name",
                "compression",
                "sizes",
                "empty with huge sizes",
                "raw sizes",
                "garbage floats",
            ]
        )
    )
    raw_sizes = None
    if label == "buffer truncated":
        target.buffer = target.buffer[: draw(st.integers(0, len(target.buffer) - 1))]
    elif label == "buffer extended":
        target.buffer += draw(st.binary(min_size=1, max_size=64))
    elif label == "dtype name":
        target.dtype = draw(
            (st.sampled_from(sorted(WIRE_DTYPES)) | st.text(max_size=40)).filter(
                lambda name: _misreads(target.dtype, name)
            )
        )
    elif label == "compression":
        target.compression = draw(st.integers(1, 5))
    elif label == "sizes":
        sizes = st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 9), max_size=10)
        target.size[:] = draw(sizes.filter(lambda s: s != list(target.size)))
    elif label == "empty with huge sizes":  # no bytes at all, so only the sizes themselves can be refused
        target.buffer = b""
        sizes = st.lists(st.integers(0, 2**32 - 1) | st.just(2**32 - 1), min_size=1, max_size=8)
        target.size[:] = draw(sizes.filter(lambda s: 0 in s))
    elif label == "raw sizes":  # varints no protobuf library would write: negative, beyond 32 bits
        raw_sizes = draw(
            st.lists(
                st.integers(-(2**63), 2**64 - 1) | st.sampled_from([-1, -4, 2**40]), min_size=1, max_size=9
            ).filter(lambda s: [v % 2**32 for v in s] != list(target.size))
        )
    else:
        return _garbage_floats(inputs, draw)
    if raw_sizes is None:
        request = request_of(inputs.uid, serialized, pack_metadata(inputs.metadata))
        return unary(label, request, Expect.REFUSAL, method=inputs.method)
    del target.size[:]
    damaged = target.SerializeToString() + b"".join(_varint_field(2, value) for value in raw_sizes)
    fields = [damaged if t is target else t.SerializeToString() for t in serialized]
    head = request_of(inputs.uid, [], pack_metadata(inputs.metadata)).SerializeToString()
    message = head + b"".join(_length_delimited_field(2, t) for t in fields)
    return FuzzCase(label, inputs.method, False, [message], Expect.REFUSAL)


def _misreads(dtype: str, other: str) -> bool:
    """Whether reading a tensor of ``dtype`` as ``other`` breaks it (a 0/1 mask of int8 read as uint8 does not)."""
    if other == dtype:
        return False
    if dtype in WIRE_DTYPES and other in WIRE_DTYPES:
        ours, theirs = WIRE_DTYPES[dtype], WIRE_DTYPES[other]
        same_size = ours.itemsize == theirs.itemsize
        return not (same_size and not ours.is_floating_point and not theirs.is_floating_point)
    return True


def _garbage_floats(inputs: SpanInputs, draw: st.DrawFn) -> FuzzCase:
    """Hidden states of random bits: refused when any is not finite, else answered like any others."""
    data = draw(st.binary(min_size=inputs.hidden.numel() * 4, max_size=inputs.hidden.numel() * 4))
    hidden = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(inputs.hidden.shape)
    inputs = _replace(inputs, hidden=hidden)
    expect = Expect.ANSWER if bool(torch.isfinite(hidden).all()) else Expect.REFUSAL
    request = valid_request(inputs)
    return unary("garbage floats", request, expect, inputs, inputs.method)


def _varint(value: int) -> bytes:
    value %= 2**64  # negative numbers as protobuf writes int64: ten bytes of two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _length_delimited_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


@st.composite
def metadata_garbage(draw: st.DrawFn) -> FuzzCase:
    """Valid tensors with metadata that is not a msgpack map of the expected fields."""
    inputs = draw(span_inputs())
    label = draw(st.sampled_from(["metadata bytes", "metadata not a map", "metadata keys", "metadata huge"]))
    if label == "metadata bytes":
        metadata = draw(st.binary(min_size=1, max_size=200).filter(_not_a_request_map))
    elif label == "metadata not a map":
        value = draw(PACKABLE_INTS | st.text() | st.binary() | st.lists(PACKABLE_INTS) | st.floats() | st.none())
        metadata = msgpack.packb(value, use_bin_type=True)
    elif label == "metadata keys":
        metadata = msgpack.packb({1: 2, **inputs.metadata}, use_bin_type=True)
    else:
        metadata = pack_metadata({**inputs.metadata, "padding": b"x" * MAX_METADATA_BYTES})
    request = request_of(inputs.uid, [serialize_tensor(t) for t in inputs.tensors()], metadata)
    return unary(label, request, Expect.REFUSAL, method=inputs.method)


def _not_a_request_map(data: bytes) -> bool:
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - not msgpack at all: garbage as wanted
        return True
    return not (isinstance(value, dict) and "request_id" in value)


@st.composite
def protobuf_garbage(draw: st.DrawFn) -> FuzzCase:
    """Bytes that are no ExpertRequest: random, a valid request cut short, or a uid that is not UTF-8."""
    label = draw(st.sampled_from(["random bytes", "request cut short", "uid not utf-8"]))
    if label == "random bytes":
        data = draw(st.binary(max_size=2000))
    elif label == "request cut short":
        inputs = draw(span_inputs())
        whole = valid_request(inputs).SerializeToString()
        data = whole[: draw(st.integers(0, len(whole) - 1))]
    else:
        data = _length_delimited_field(1, b"\xff\xfe" + draw(st.binary(max_size=20)))
    method = draw(st.sampled_from(["forward", "backward"]))
    return FuzzCase(label, method, draw(st.booleans()), [data], Expect.REJECTION)


@st.composite
def stream_lies(draw: st.DrawFn) -> FuzzCase:
    """A streamed valid request whose parts lie about their count or order, or a client that hangs up."""
    inputs = draw(span_inputs())
    serialized = [serialize_tensor(t) for t in inputs.tensors()]
    chunk = draw(st.sampled_from([256, 2048]))
    parts = [part for tensor in serialized for part in split_tensor(tensor, chunk_bytes=chunk)]
    headers = [i for i, part in enumerate(parts) if part.dtype]
    label = draw(
        st.sampled_from(
            ["chunks more", "chunks fewer", "chunks nonsense", "part before header", "header twice", "hang up"]
        )
    )
    target = parts[draw(st.sampled_from(headers))]
    if label == "chunks more":
        target.chunks += draw(st.integers(1, 10**6))
    elif label == "chunks fewer":
        if target.chunks == 1:
            parts.insert(parts.index(target) + 1, runtime_pb2.Tensor(buffer=b"\x00" * 4))
        else:
            target.chunks -= draw(st.integers(1, target.chunks - 1))
    elif label == "chunks nonsense":
        target.chunks = draw(st.sampled_from([0, -1, -(2**31), 2**31 - 1]))
    elif label == "part before header":
        parts.insert(0, runtime_pb2.Tensor(buffer=draw(st.binary(max_size=64))))
    elif label == "header twice":
        parts.insert(
            parts.index(target) + 1,
            runtime_pb2.Tensor(buffer=b"", size=list(target.size), dtype=target.dtype, chunks=1),
        )
    metadata = pack_metadata(inputs.metadata)
    messages = [
        request_of(inputs.uid if i == 0 else "", [part], metadata if i == 0 else b"").SerializeToString()
        for i, part in enumerate(parts)
    ]
    if label == "hang up":
        return FuzzCase(
            label, inputs.method, True, messages, Expect.ANY, hang_up_after=draw(st.integers(0, len(messages) - 1))
        )
    return FuzzCase(label, inputs.method, True, messages, Expect.REFUSAL)


@st.composite
def framing_garbage(draw: st.DrawFn) -> FuzzCase:
    """Stream bytes that break the framing: an unknown marker byte, or a length no server should read."""
    if draw(st.booleans()):
        label, data = "unknown marker", bytes([draw(st.integers(2, 255))]) + draw(st.binary(max_size=64))
    else:
        length = draw(st.integers(MAX_STREAM_MESSAGE_BYTES + 1, 2**64 - 1))
        label, data = "message too long", b"\x00" + length.to_bytes(8, "big") + draw(st.binary(max_size=64))
    method = draw(st.sampled_from(["forward", "backward"]))
    return FuzzCase(label, method, True, [], Expect.REFUSAL, raw_stream=data)


def fuzz_cases() -> st.SearchStrategy[FuzzCase]:
    return st.one_of(
        valid_requests(),
        field_mutations(),
        wire_mutations(),
        metadata_garbage(),
        protobuf_garbage(),
        stream_lies(),
        framing_garbage(),
    )
