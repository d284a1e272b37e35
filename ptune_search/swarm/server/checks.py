"""Checks a block server applies to every forward/backward request before any work is queued.

A request is refused with :class:`RequestRefused` whose message names the offending part and what the
server expects, e.g. ``hidden states must have hidden size 64 (got 32)``. The layout of the tensors:

- forward:  ``[hidden [B, T, H], attention_mask [B, T], (deep_prompts [B or 1, P * n, H])]``
- backward: ``[hidden [B, T, H], attention_mask [B, T], grad_outputs [B, T, H], (deep_prompts)]``

and the metadata: ``{"request_id": str, "pre_seq_len": int (0 without deep prompts), "keep": bool}``
(``keep``: forward only, keep the graph for the backward that follows).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from hivemind.proto import runtime_pb2

from ptune_search.swarm.protocol import (
    ErrorKind,
    RequestLimits,
    RequestRefused,
    ServedModel,
    metadata_field,
    parse_span_uid,
    unpack_metadata,
)
from ptune_search.swarm.wire import HALF_WIRE_DTYPES, deserialize_tensor, dtype_name

MAX_REQUEST_ID = 128
MASK_DTYPES = (torch.int64, torch.int32, torch.int8, torch.uint8)


@dataclasses.dataclass(frozen=True)
class ServedSpan:
    """What a server serves, to check requests against."""

    prefix: str
    start: int
    end: int
    hidden_size: int
    dtype: torch.dtype
    limits: RequestLimits
    model: Optional[ServedModel] = None


@dataclasses.dataclass
class SpanRequest:
    start: int
    end: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    prompts: Optional[torch.Tensor]
    grad_outputs: Optional[torch.Tensor]
    request_id: str
    keep_activations: bool
    wire_dtype: torch.dtype  # hidden-size tensors came in it and go back in it (the server's or a 16-bit one)


def bad_request(message: str) -> RequestRefused:
    return RequestRefused(ErrorKind.BAD_REQUEST, message)


def check_payload_size(messages: Sequence[runtime_pb2.Tensor], limits: RequestLimits) -> None:
    size = sum(len(message.buffer) for message in messages)
    if size > limits.max_payload_bytes:
        raise bad_request(f"payload of {size} bytes exceeds the server's limit of {limits.max_payload_bytes} bytes")


def decode_tensors(messages: Sequence[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    try:
        return [deserialize_tensor(message) for message in messages]
    except ValueError as e:
        raise bad_request(f"malformed tensor: {e}") from None


def parse_span_request(
    kind: str, uid: str, tensors: Sequence[torch.Tensor], metadata: bytes, served: ServedSpan
) -> SpanRequest:
    """Check a ``kind`` ("forward" or "backward") request for the blocks in ``uid``; refuse it if anything is off."""
    start, end = _check_blocks(uid, served)
    try:
        fields = unpack_metadata(metadata)
        request_id = metadata_field(fields, "request_id", str)
        pre_seq_len = metadata_field(fields, "pre_seq_len", int, 0)
        keep = metadata_field(fields, "keep", bool, False)
        model = ServedModel.from_dict(fields["model"]) if "model" in fields else None
    except ValueError as e:
        raise bad_request(f"bad metadata: {e}") from None
    _check_model(model, served)
    if not 0 < len(request_id) <= MAX_REQUEST_ID:
        raise bad_request(f"request_id must have 1..{MAX_REQUEST_ID} characters")
    if pre_seq_len < 0:
        raise bad_request(f"pre_seq_len must be >= 0 (got {pre_seq_len})")

    base = 3 if kind == "backward" else 2
    has_prompts = pre_seq_len > 0
    if len(tensors) != base + has_prompts:
        names = "hidden, attention_mask" + (", grad_outputs" if kind == "backward" else "")
        raise bad_request(
            f"a {kind} request carries [{names}] plus deep prompts when pre_seq_len > 0 "
            f"(got {len(tensors)} tensors with pre_seq_len={pre_seq_len})"
        )
    hidden, mask = tensors[0], tensors[1]
    grad_outputs = tensors[2] if kind == "backward" else None
    prompts = tensors[base] if has_prompts else None

    _check_hidden("hidden states", hidden, served)
    wire_dtype = hidden.dtype
    batch, length, _ = hidden.shape
    if batch * length > served.limits.max_tokens:
        raise bad_request(
            f"too many tokens: batch {batch} x length {length} = {batch * length} exceeds the server's "
            f"limit of {served.limits.max_tokens}; split the batch"
        )
    _check_mask(mask, batch, length)
    if grad_outputs is not None:
        _check_hidden("grad_outputs", grad_outputs, served)
        if grad_outputs.shape != hidden.shape or grad_outputs.dtype != wire_dtype:
            raise bad_request(
                f"grad_outputs must have the shape and dtype of hidden {list(hidden.shape)} {dtype_name(wire_dtype)}, "
                f"got {list(grad_outputs.shape)} {dtype_name(grad_outputs.dtype)}"
            )
    if prompts is not None:
        _check_prompts(prompts, pre_seq_len, batch, length, end - start, served)
    for name, tensor in (("hidden states", hidden), ("grad_outputs", grad_outputs), ("deep prompts", prompts)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise bad_request(f"{name} contain NaN or infinite values")
    hidden = hidden.to(served.dtype)
    grad_outputs = None if grad_outputs is None else grad_outputs.to(served.dtype)
    return SpanRequest(start, end, hidden, mask, prompts, grad_outputs, request_id, keep, wire_dtype)


@dataclasses.dataclass(frozen=True)
class SessionRequest:
    """An inference session's opening: its blocks, rows, positions (prefix included) and idle timeout."""

    start: int
    end: int
    batch_size: int
    max_length: int
    pre_seq_len: int
    timeout: float


@dataclasses.dataclass
class SessionStep:
    hidden: torch.Tensor  # [B, t, H] in the server's dtype
    step_mask: torch.Tensor  # [B, t]
    prompts: Optional[torch.Tensor]  # [B or 1, P * n, H] while the step's positions reach into the prefix
    wire_dtype: torch.dtype


def parse_session_open(uid: str, metadata: bytes, served: ServedSpan) -> SessionRequest:
    """Check an inference session's first message: ``{"open": {"batch_size", "max_length", "pre_seq_len",
    "timeout"}}``; its cache (``batch_size x max_length`` positions) must fit the token limit of a request."""
    start, end = _check_blocks(uid, served)
    try:
        fields = unpack_metadata(metadata)
        opening = metadata_field(fields, "open", dict)
        batch_size = metadata_field(opening, "batch_size", int)
        max_length = metadata_field(opening, "max_length", int)
        pre_seq_len = metadata_field(opening, "pre_seq_len", int, 0)
        timeout = metadata_field(opening, "timeout", float, served.limits.session_timeout)
        model = ServedModel.from_dict(fields["model"]) if "model" in fields else None
    except ValueError as e:
        raise bad_request(f"bad session metadata: {e}") from None
    _check_model(model, served)
    if batch_size < 1 or max_length < 1 or batch_size * max_length > served.limits.max_tokens:
        raise bad_request(
            f"a session's batch_size x max_length must be 1..{served.limits.max_tokens} (the server's token "
            f"limit), got {batch_size} x {max_length}"
        )
    if not 0 <= pre_seq_len < max_length or pre_seq_len > served.limits.max_pre_seq_len:
        raise bad_request(
            f"pre_seq_len {pre_seq_len} must be below max_length {max_length} "
            f"and at most the server's limit {served.limits.max_pre_seq_len}"
        )
    if not timeout > 0:
        raise bad_request(f"a session's timeout must be > 0 seconds (got {timeout})")
    return SessionRequest(start, end, batch_size, max_length, pre_seq_len, min(timeout, served.limits.session_timeout))


def parse_session_step(
    tensors: Sequence[torch.Tensor], session: SessionRequest, position: int, served: ServedSpan
) -> SessionStep:
    """Check a step ``[hidden [B, t, H], step_mask [B, t], (deep prompts)]`` at ``position`` of ``session``:
    deep prompts come exactly with the steps whose positions reach into the prefix."""
    wants_prompts = session.pre_seq_len > 0 and position < session.pre_seq_len
    if len(tensors) != 2 + wants_prompts:
        raise bad_request(
            f"a step at position {position} carries [hidden, step_mask]"
            + (" and the deep prompts of the prefix" if wants_prompts else "")
            + f" (got {len(tensors)} tensors)"
        )
    hidden, mask = tensors[0], tensors[1]
    _check_hidden("hidden states", hidden, served)
    batch, length, _ = hidden.shape
    if batch != session.batch_size:
        raise bad_request(f"the session was opened for batch size {session.batch_size}, the step has {batch}")
    if position + length > session.max_length:
        raise bad_request(
            f"the step's {length} positions after {position} exceed the session's max_length {session.max_length}"
        )
    _check_mask(mask, batch, length)
    prompts = tensors[2] if wants_prompts else None
    if prompts is not None:
        num_blocks = session.end - session.start
        _check_prompts(prompts, session.pre_seq_len, batch, session.max_length, num_blocks, served)
    for name, tensor in (("hidden states", hidden), ("deep prompts", prompts)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise bad_request(f"{name} contain NaN or infinite values")
    return SessionStep(hidden.to(served.dtype), mask, prompts, hidden.dtype)


def _check_model(model: Optional[ServedModel], served: ServedSpan) -> None:
    if model is not None and served.model is not None and model != served.model:
        raise bad_request(
            f"this server serves {served.model}, but the request is for {model}: the client loaded another "
            "checkpoint than the servers of its DHT prefix"
        )


def _check_blocks(uid: str, served: ServedSpan) -> tuple[int, int]:
    try:
        prefix, start, end = parse_span_uid(uid)
    except ValueError as e:
        raise bad_request(str(e)) from None
    if prefix != served.prefix or start < served.start or end > served.end:
        raise RequestRefused(
            ErrorKind.UNKNOWN_BLOCK,
            f"unknown blocks {uid[:200]!r}: this server serves {served.prefix}.{served.start}"
            f"..{served.prefix}.{served.end - 1}",
        )
    return start, end


def _check_hidden(name: str, tensor: torch.Tensor, served: ServedSpan) -> None:
    if tensor.ndim != 3:
        raise bad_request(f"{name} must be [batch, length, hidden] (got {tensor.ndim} dimensions)")
    if tensor.dtype != served.dtype and dtype_name(tensor.dtype) not in HALF_WIRE_DTYPES:
        raise bad_request(
            f"{name} must be {dtype_name(served.dtype)} (the server's dtype) or one of the 16-bit wire dtypes "
            f"{sorted(HALF_WIRE_DTYPES)}, got {dtype_name(tensor.dtype)}"
        )
    if tensor.shape[2] != served.hidden_size:
        raise bad_request(f"{name} must have hidden size {served.hidden_size} (got {tensor.shape[2]})")
    if tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise bad_request(f"{name} are empty: shape {list(tensor.shape)}")


def _check_mask(mask: torch.Tensor, batch: int, length: int) -> None:
    if mask.dtype not in MASK_DTYPES:
        raise bad_request(f"attention_mask must be an integer tensor of 0/1, got {dtype_name(mask.dtype)}")
    if tuple(mask.shape) != (batch, length):
        raise bad_request(f"attention_mask must be [batch, length] = {[batch, length]}, got {list(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise bad_request("attention_mask must contain only 0 and 1")


def _check_prompts(
    prompts: torch.Tensor, pre_seq_len: int, batch: int, length: int, num_blocks: int, served: ServedSpan
) -> None:
    if pre_seq_len > served.limits.max_pre_seq_len or pre_seq_len > length:
        raise bad_request(
            f"pre_seq_len {pre_seq_len} must be at most the sequence length {length} "
            f"and the server's limit {served.limits.max_pre_seq_len}"
        )
    expected = [pre_seq_len * num_blocks, served.hidden_size]
    if prompts.ndim != 3 or prompts.shape[0] not in (1, batch) or list(prompts.shape[1:]) != expected:
        raise bad_request(
            f"deep prompts for {num_blocks} blocks with pre_seq_len {pre_seq_len} must be "
            f"[{batch} or 1, {expected[0]}, {expected[1]}], got {list(prompts.shape)}"
        )
    if prompts.dtype not in (torch.float32, served.dtype):
        raise bad_request(
            f"deep prompts must be float32 or {dtype_name(served.dtype)}, got {dtype_name(prompts.dtype)}"
        )
