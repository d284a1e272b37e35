"""What a client accepts from a server: a server that answers wrongly has failed, like one that is down.

A forward answers one tensor shaped and typed like the hidden states sent; a backward answers the grad of
the hidden states and, with deep prompts, the grad of the prompts sent, each shaped and typed like what it is
the grad of. Values must be finite (the server refuses non-finite inputs, so a NaN is the server's doing).
Framing (chunk counts, buffer sizes, metadata) is checked while decoding, in :mod:`~ptune_search.swarm.wire`.
The chain bans a server whose answer fails these checks and retries the hop elsewhere.
"""

from __future__ import annotations

from typing import Sequence

import torch


class MalformedResponse(ConnectionError):
    """A server's answer is not what the request asks for."""


def check_outputs(server: str, method: str, outputs: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> None:
    """Raise :class:`MalformedResponse` naming ``server`` unless ``outputs`` match ``expected`` in count, shape,
    dtype, and are finite."""
    if len(outputs) != len(expected):
        raise MalformedResponse(
            f"server {server} answered a {method} with {len(outputs)} tensors instead of {len(expected)}"
        )
    for index, (output, like) in enumerate(zip(outputs, expected)):
        if output.shape != like.shape or output.dtype != like.dtype:
            raise MalformedResponse(
                f"server {server} answered a {method} with tensor {index} of shape {list(output.shape)} "
                f"and {output.dtype} instead of {list(like.shape)} and {like.dtype}"
            )
        if not torch.isfinite(output).all():
            raise MalformedResponse(f"server {server} answered a {method} with non-finite values in tensor {index}")
