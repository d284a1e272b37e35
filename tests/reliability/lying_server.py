"""A block server that lies: ``python -m tests.reliability.lying_server serve ... --lie``.

It computes every request as the real server does and answers every third one truly (so clients also send
it backwards, which it answers with a lie); the others get the next lie of :data:`LIES`, in turn: a wrong
shape, NaN values, a wrong dtype, an extra tensor, a tensor cut short of the parts it announced, a part that
belongs to no tensor, a garbage buffer, a ``bad_request`` refusal of the good request. Three are framing
lies of streamed responses, so its clients must stream (``stream_threshold=1``). Each lie is logged as
``telling lie <name> to a <forward|backward>``. Without ``--lie`` (and for ``dht``) it is
``python -m ptune_search.swarm``. Tests run it through :class:`LyingSwarm`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from ptune_search.swarm import __main__ as swarm_main
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.protocol import ErrorKind, RequestRefused, pack_metadata
from ptune_search.swarm.server import block_server, handlers
from ptune_search.swarm.wire import response_messages

LIES = ("shape", "nan", "dtype", "count", "truncated", "extra_part", "garbage", "bad_request")
FRAMING_LIES = frozenset({"truncated", "extra_part", "garbage"})
logger = logging.getLogger("lying_server")


class LyingSwarm(LocalSwarm):
    """A LocalSwarm whose servers started with ``extra_args=["--lie"]`` lie."""

    module = "tests.reliability.lying_server"


class LyingHandlers(handlers.BlockRPCHandlers):
    answered = 0
    told = 0
    framing_lie: str | None = None  # for the streamed response being written

    async def _process(self, kind: str, *args: Any) -> tuple[list[torch.Tensor], dict[str, Any]]:
        outputs, metadata = await super()._process(kind, *args)
        LyingHandlers.answered += 1
        if LyingHandlers.answered % 3 == 0:
            return outputs, metadata
        lie = LIES[LyingHandlers.told % len(LIES)]
        LyingHandlers.told += 1
        logger.warning(f"telling lie {lie} to a {kind}")
        if lie == "bad_request":
            raise RequestRefused(ErrorKind.BAD_REQUEST, "hidden size 63, expected 64 (a lie: the request is good)")
        if lie == "shape":
            outputs[0] = outputs[0][:, :-1]
        elif lie == "nan":
            outputs[0] = torch.full_like(outputs[0], float("nan"))
        elif lie == "dtype":
            outputs[0] = outputs[0].double()
        elif lie == "count":
            outputs = [*outputs, outputs[0]]
        LyingHandlers.framing_lie = lie if lie in FRAMING_LIES else None
        return outputs, metadata


def lying_response_messages(tensors: Any, metadata: dict[str, Any]) -> list[runtime_pb2.ExpertResponse]:
    lie, LyingHandlers.framing_lie = LyingHandlers.framing_lie, None
    messages = response_messages(tensors, metadata)
    first = messages[0].tensors[0]
    if lie == "truncated":
        first.chunks += 1
    elif lie == "extra_part":
        messages[0].metadata = pack_metadata({**metadata, "messages": len(messages) + 1})
        messages.append(runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(buffer=b"\x00" * 16)]))
    elif lie == "garbage":
        first.buffer = b"\x13garbage" * 3
    return messages


def main() -> None:
    argv = sys.argv[1:]
    if "--lie" in argv:
        argv.remove("--lie")
        block_server.BlockRPCHandlers = LyingHandlers
        handlers.response_messages = lying_response_messages
    swarm_main.main(argv)


if __name__ == "__main__":
    main()
