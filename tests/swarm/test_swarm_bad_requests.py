"""Bad requests sent straight to a block server get a clear error, and the server goes on serving.

The server under test serves blocks 0..2 of ``tiny-swarm`` with at most 512 tokens and 3 MiB per request.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from swarm_testing import HIDDEN, MAX_PAYLOAD, MAX_TOKENS

from ptune_search.models.fingerprint import model_fingerprint
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.protocol import (
    BlockService,
    ErrorKind,
    RequestRefused,
    pack_metadata,
    raise_if_error,
    unpack_metadata,
)
from ptune_search.swarm.wire import call_server, serialize_tensor

SPAN = "tiny-swarm.0 tiny-swarm.1 tiny-swarm.2"


def hidden(batch: int = 2, length: int = 5, size: int = HIDDEN, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, length, size).to(dtype)


def mask(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.ones(batch, length, dtype=torch.long)


def meta(**fields) -> dict:
    return {"request_id": "r1", "pre_seq_len": 0, **fields}


@pytest.fixture
def server(swarm2):
    """(connection, stub) of the server of blocks 0..2, talked to directly through hivemind."""
    connection = SwarmConnection(swarm2.initial_peers)
    peer = PeerID.from_base58(swarm2.servers[0].peer_id)
    try:
        yield connection, BlockService.get_stub(connection.p2p, peer)
    finally:
        connection.close()


def send(server, method: str, uid: str, tensors, metadata: dict):
    connection, stub = server
    return connection.run(
        call_server(stub, method, uid, tensors, metadata, timeout=30, stream_threshold=ClientConfig.stream_threshold),
        timeout=60,
    )


def send_raw(server, request: runtime_pb2.ExpertRequest):
    connection, stub = server

    async def call():
        response = await stub.rpc_forward(request, timeout=30)
        raise_if_error(unpack_metadata(response.metadata))
        return response

    return connection.run(call(), timeout=60)


def assert_still_serving(server) -> None:
    (output,), _ = send(server, "forward", SPAN, [hidden(), mask()], meta(request_id="good"))
    assert output.shape == (2, 5, HIDDEN) and torch.isfinite(output).all()


def nan_hidden() -> torch.Tensor:
    x = hidden()
    x[1, 2, 3] = float("nan")
    return x


def mask_of_twos() -> torch.Tensor:
    return mask() * 2


BAD_REQUESTS: dict[str, tuple[Callable, ErrorKind, str]] = {
    "wrong hidden size": (
        lambda s: send(s, "forward", SPAN, [hidden(size=32), mask()], meta()),
        ErrorKind.BAD_REQUEST,
        "hidden size 64 (got 32)",
    ),
    "wrong dtype": (
        lambda s: send(s, "forward", SPAN, [hidden(dtype=torch.float64), mask()], meta()),
        ErrorKind.BAD_REQUEST,
        "must be float32 (the server's dtype) or one of the 16-bit wire dtypes ['bfloat16', 'float16'], got float64",
    ),
    "NaN": (lambda s: send(s, "forward", SPAN, [nan_hidden(), mask()], meta()), ErrorKind.BAD_REQUEST, "NaN"),
    "too many tokens": (
        lambda s: send(s, "forward", SPAN, [hidden(1, MAX_TOKENS + 1), mask(1, MAX_TOKENS + 1)], meta()),
        ErrorKind.BAD_REQUEST,
        f"too many tokens: batch 1 x length {MAX_TOKENS + 1}",
    ),
    "unknown uid": (
        lambda s: send(s, "forward", "tiny-swarm.4", [hidden(), mask()], meta()),
        ErrorKind.UNKNOWN_BLOCK,
        "this server serves tiny-swarm.0..tiny-swarm.2",
    ),
    "another model's uid": (
        lambda s: send(s, "forward", "other-model.0", [hidden(), mask()], meta()),
        ErrorKind.UNKNOWN_BLOCK,
        "unknown blocks 'other-model.0'",
    ),
    "not a uid": (
        lambda s: send(s, "forward", "tiny-swarm.0 tiny-swarm.2", [hidden(), mask()], meta()),
        ErrorKind.BAD_REQUEST,
        "consecutive",
    ),
    "prompts of the wrong shape": (
        lambda s: send(s, "forward", SPAN, [hidden(), mask(), torch.zeros(1, 5, HIDDEN)], meta(pre_seq_len=2)),
        ErrorKind.BAD_REQUEST,
        "deep prompts for 3 blocks with pre_seq_len 2 must be [2 or 1, 6, 64], got [1, 5, 64]",
    ),
    "prompts longer than the sequence": (
        lambda s: send(s, "forward", SPAN, [hidden(), mask(), torch.zeros(1, 18, HIDDEN)], meta(pre_seq_len=6)),
        ErrorKind.BAD_REQUEST,
        "pre_seq_len 6 must be at most the sequence length 5",
    ),
    "mask of other values than 0 and 1": (
        lambda s: send(s, "forward", SPAN, [hidden(), mask_of_twos()], meta()),
        ErrorKind.BAD_REQUEST,
        "attention_mask must contain only 0 and 1",
    ),
    "missing tensors": (
        lambda s: send(s, "forward", SPAN, [hidden()], meta()),
        ErrorKind.BAD_REQUEST,
        "a forward request carries [hidden, attention_mask]",
    ),
    "grad of the wrong shape": (
        lambda s: send(s, "backward", SPAN, [hidden(), mask(), hidden(length=4)], meta()),
        ErrorKind.BAD_REQUEST,
        "grad_outputs must have the shape and dtype of hidden [2, 5, 64] float32, got [2, 4, 64] float32",
    ),
    "garbage metadata": (
        lambda s: send_raw(
            s,
            runtime_pb2.ExpertRequest(
                uid=SPAN, tensors=[serialize_tensor(hidden()), serialize_tensor(mask())], metadata=b"\xc1\x00garbage"
            ),
        ),
        ErrorKind.BAD_REQUEST,
        "bad metadata: metadata is not valid msgpack",
    ),
    "metadata without a request id": (
        lambda s: send_raw(
            s,
            runtime_pb2.ExpertRequest(
                uid=SPAN,
                tensors=[serialize_tensor(hidden()), serialize_tensor(mask())],
                metadata=pack_metadata({"keep": "yes"}),
            ),
        ),
        ErrorKind.BAD_REQUEST,
        "metadata lacks the field 'request_id'",
    ),
    "a buffer shorter than its shape": (
        lambda s: send_raw(
            s,
            runtime_pb2.ExpertRequest(
                uid=SPAN,
                tensors=[runtime_pb2.Tensor(buffer=b"123", size=[2, 5, HIDDEN], dtype="float32")],
                metadata=pack_metadata(meta()),
            ),
        ),
        ErrorKind.BAD_REQUEST,
        "tensor buffer has 3 bytes but shape [2, 5, 64] of float32 needs 2560",
    ),
    "an unknown dtype": (
        lambda s: send_raw(
            s,
            runtime_pb2.ExpertRequest(
                uid=SPAN,
                tensors=[runtime_pb2.Tensor(buffer=b"", size=[0], dtype="object")],
                metadata=pack_metadata(meta()),
            ),
        ),
        ErrorKind.BAD_REQUEST,
        "unsupported tensor dtype 'object'",
    ),
    "an oversized payload": (
        lambda s: send(s, "forward", SPAN, [hidden(1, MAX_PAYLOAD // (4 * HIDDEN) + 8), mask(1, 8)], meta()),
        ErrorKind.BAD_REQUEST,
        f"payload exceeds the server's limit of {MAX_PAYLOAD} bytes",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_with_a_clear_error_and_the_server_keeps_serving(server, case):
    make_request, kind, message = BAD_REQUESTS[case]
    with pytest.raises(RequestRefused) as refused:
        make_request(server)
    assert refused.value.kind == kind
    assert message in refused.value.message
    assert_still_serving(server)


def test_refusal_reaches_a_model_client_as_an_exception_naming_the_server(swarm2, remote_classifier):
    """A client whose requests are too large learns why once a second try is refused too (a single refusal may be
    a liar's), and no server stays banned for it."""
    model = remote_classifier(swarm2, tuning_mode="ptune", pre_seq_len=4)
    input_ids = torch.zeros(1, MAX_TOKENS, dtype=torch.long)  # + 4 prompt positions > the 512 token limit
    with pytest.raises(RequestRefused, match="too many tokens"):
        model(input_ids=input_ids)
    chain = model.model.layers
    assert chain.passes.stats["failed_calls"] == 1 and chain.passes.stats["false_refusals"] == 0
    assert not any(chain.router.is_banned(PeerID.from_base58(child.peer_id)) for child in swarm2.servers)


def test_info_describes_the_served_blocks_and_limits(server):
    connection, stub = server

    async def info():
        return unpack_metadata((await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=30)).metadata)

    described = connection.run(info(), timeout=60)
    assert (described["prefix"], described["start"], described["end"]) == ("tiny-swarm", 0, 3)
    assert described["hidden_size"] == HIDDEN and described["dtype"] == "float32"
    assert described["limits"]["max_tokens"] == MAX_TOKENS and described["limits"]["max_payload_bytes"] == MAX_PAYLOAD


def test_a_request_for_another_model_is_refused_naming_both(server, swarm_model):
    ours = model_fingerprint(swarm_model)
    other = {"model_type": "bloom", "fingerprint": "bloom/sha256:" + "0" * 64}
    with pytest.raises(RequestRefused) as refused:
        send(server, "forward", SPAN, [hidden(), mask()], meta(model=other))
    assert refused.value.kind == ErrorKind.BAD_REQUEST
    assert f"this server serves a llama model (fingerprint {ours}), but the request is for a bloom model" in str(
        refused.value
    )
    (output,), _ = send(
        server, "forward", SPAN, [hidden(), mask()], meta(model={"model_type": "llama", "fingerprint": ours})
    )
    assert output.shape == (2, 5, HIDDEN)
