"""The model's transformer blocks as served by the swarm: a module with the call signature of local blocks.

``RemoteBlockChain.connect(config)`` joins the swarm through ``config.initial_peers`` and finds the blocks
``<prefix>.0 .. <prefix>.<L-1>`` (prefix: see :func:`~ptune_search.swarm.protocol.model_prefix`). Calling it
as ``chain(hidden [B, T, H], attention_mask [B, T], deep_prompts [B, P * L, H] or None)`` runs all blocks
remotely; with grad enabled it is an autograd function whose backward returns grads for the hidden states
and the deep prompts. Deep prompts expanded over the batch (``get_prompt``) travel once, not ``B`` times.

Example::

    from ptune_search.models import DistributedLlamaModel
    from ptune_search.models.distributed import distributed_config

    config = distributed_config(DistributedLlamaModel, path, None, {"initial_peers": initial_peers})
    chain = RemoteBlockChain.connect(config)
    hidden = torch.randn(2, 5, config.hidden_size)  # [batch, length, hidden], the input of block 0
    hidden = chain(hidden, torch.ones(2, 5), None)  # attention mask [batch, length], no deep prompts
    chain.close()
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ptune_search.swarm.client.chain_passes import ChainPasses, Hop
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.client.inference_session import RemoteInferenceSession
from ptune_search.swarm.client.routing import BlockRouter
from ptune_search.swarm.protocol import ServedModel, model_prefix
from ptune_search.swarm.wire import HALF_WIRE_DTYPES


class RemoteBlockChain(nn.Module):
    def __init__(
        self,
        connection: SwarmConnection,
        prefix: str,
        num_blocks: int,
        settings: ClientConfig,
        model: Optional[ServedModel] = None,
    ):
        super().__init__()
        self.connection, self.prefix, self.num_blocks, self.settings = connection, prefix, num_blocks, settings
        self.router = BlockRouter(connection.node, prefix, num_blocks, settings, model=model)
        self.passes = ChainPasses(connection.p2p, self.router, settings)
        self.last_route: list[tuple[str, int, int]] = []  # (peer id, start, end) of the last forward's hops

    @classmethod
    def connect(
        cls,
        config: ClientConfig,
        *,
        initial_peers: Optional[Sequence[str]] = None,
        model: Optional[ServedModel] = None,
    ) -> "RemoteBlockChain":
        """Join the swarm of ``config.initial_peers`` (or ``initial_peers``) for the model ``config`` describes.

        ``config`` is a model's ``Distributed<Family>Config``: a :class:`ClientConfig` that also names the
        checkpoint (for the DHT prefix) and its ``num_hidden_layers``. With ``model`` (the checkpoint's family
        and fingerprint), servers of another model are refused, and refuse this client's requests.
        """
        if config.wire_dtype is not None and config.wire_dtype not in HALF_WIRE_DTYPES:
            raise ValueError(
                f"wire_dtype must be None (the servers' dtype) or one of {sorted(HALF_WIRE_DTYPES)}, "
                f"got {config.wire_dtype!r}"
            )
        peers = list(initial_peers or config.initial_peers or [])
        connection = SwarmConnection(peers)
        return cls(connection, model_prefix(config), config.num_hidden_layers, config, model)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, deep_prompts: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        attention_mask = self._check_inputs(hidden, attention_mask, deep_prompts)
        needs_grad = torch.is_grad_enabled() and (
            hidden.requires_grad or (deep_prompts is not None and deep_prompts.requires_grad)
        )
        if needs_grad:
            return _RemoteChainFunction.apply(hidden, attention_mask, deep_prompts, self)
        prompts = _wire_prompts(deep_prompts)
        output, hops = self.connection.run(
            self.passes.forward(hidden.detach(), attention_mask, prompts, 0, self.num_blocks, keep=False)
        )
        self._remember(hops)
        return output

    def inference_session(self, batch_size: int, max_length: int, pre_seq_len: int = 0) -> RemoteInferenceSession:
        """A session of at most ``max_length`` positions on servers that keep its caches; ``pre_seq_len``:
        the length of the deep prompts' prefix (0 without deep prompts)."""
        return RemoteInferenceSession(self.connection, self.router, self.passes, batch_size, max_length, pre_seq_len)

    def close(self) -> None:
        self.connection.close()

    def _remember(self, hops: list[Hop]) -> None:
        self.last_route = [(span.peer_id.to_base58(), span.start, span.end) for span in (hop.span for hop in hops)]

    def _check_inputs(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, deep_prompts: Optional[torch.Tensor]
    ) -> torch.Tensor:
        if hidden.ndim != 3:
            raise ValueError(f"hidden states must be [batch, length, hidden], got shape {list(hidden.shape)}")
        if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"attention_mask must be {list(hidden.shape[:2])}, got {list(attention_mask.shape)}")
        if deep_prompts is not None:
            batch, rows, size = deep_prompts.shape
            if batch != hidden.shape[0] or size != hidden.shape[2] or rows % self.num_blocks or not rows:
                raise ValueError(
                    f"deep prompts must be [batch, pre_seq_len * {self.num_blocks}, hidden] = "
                    f"[{hidden.shape[0]}, P * {self.num_blocks}, {hidden.shape[2]}], got {list(deep_prompts.shape)}"
                )
        return attention_mask.detach().to(torch.long).cpu()

    def extra_repr(self) -> str:
        return f"prefix={self.prefix!r}, num_blocks={self.num_blocks}, peers={self.connection.initial_peers}"


def _wire_prompts(deep_prompts: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Deep prompts as sent: one row when they are the same for the whole batch (an expanded view)."""
    if deep_prompts is None:
        return None
    deep_prompts = deep_prompts.detach()
    if deep_prompts.shape[0] > 1 and deep_prompts.stride(0) == 0:
        return deep_prompts[:1]
    return deep_prompts


class _RemoteChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, attention_mask, deep_prompts, chain: RemoteBlockChain):
        prompts = _wire_prompts(deep_prompts)
        output, hops = chain.connection.run(
            chain.passes.forward(hidden.detach(), attention_mask, prompts, 0, chain.num_blocks, keep=True)
        )
        chain._remember(hops)
        ctx.chain, ctx.hops, ctx.prompts = chain, hops, prompts
        ctx.batch = hidden.shape[0]
        ctx.save_for_backward(attention_mask)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (attention_mask,) = ctx.saved_tensors
        chain: RemoteBlockChain = ctx.chain
        grad_hidden, grad_prompts = chain.connection.run(
            chain.passes.backward(grad_output.contiguous(), attention_mask, ctx.prompts, ctx.hops)
        )
        if grad_prompts is not None and grad_prompts.shape[0] != ctx.batch:
            # The prompts were one shared row: its grad is the batch's sum, which the expand's backward re-sums.
            grad_prompts = (grad_prompts / ctx.batch).expand(ctx.batch, -1, -1)
        return grad_hidden, None, grad_prompts, None
