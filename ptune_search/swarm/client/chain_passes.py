"""Forward and backward passes over a chain of remote spans, with retries, bans and re-routing.

Forward walks the blocks from ``start`` to ``end``: each hop asks the router for a span starting at the
current block, sends the hidden states (and that span's deep prompts), and records a :class:`Hop`. A failed
hop bans its server and is retried from the same block on another route, after a backoff. When every known
server of that block is banned, the router re-reads the DHT first: a server that died is gone once its
records expire, and the router then waits for a replacement (``block_wait_timeout``) or raises
:class:`~ptune_search.swarm.client.routing.MissingBlockError` naming the block.

Backward walks the hops in reverse; each server finds the forward graph it kept for the hop's request id.
If a server fails, the hop's blocks are run forward again elsewhere from the hop's saved input (new hops,
whose graphs the new servers keep) and the backward continues through them.

A ``bad_request`` refusal says the client's request is at fault, so no other server would answer differently;
but a lying server can say it to good requests. The first such refusal of a hop is treated as that server's
failure (banned, the hop retried elsewhere): if another server answers, the refuser stays banned as a liar;
if a second refusal comes (another server, or the same one when no other is left), the request is bad, the
refusers' bans are lifted and the refusal is raised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from typing import TYPE_CHECKING, Any, Optional

import torch

from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.client.connection import peer_unreachable
from ptune_search.swarm.client.response_checks import check_outputs
from ptune_search.swarm.client.routing import BlockRouter, RemoteSpan
from ptune_search.swarm.protocol import BlockService, ErrorKind, RequestRefused, span_uid
from ptune_search.swarm.wire import HALF_WIRE_DTYPES, WIRE_DTYPES, call_server

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID

logger = logging.getLogger(__name__)


class SwarmRequestError(RuntimeError):
    """A pass through the swarm failed after all retries."""


@dataclasses.dataclass
class Hop:
    """One forward call that succeeded: blocks of ``span`` computed from ``inputs`` under ``request_id``."""

    span: RemoteSpan
    inputs: torch.Tensor
    request_id: str


class ChainPasses:
    def __init__(self, p2p: "P2P", router: BlockRouter, settings: ClientConfig):
        self.p2p, self.router, self.settings = p2p, router, settings
        self.stats = {
            "failed_calls": 0,
            "rerouted_backward_hops": 0,
            "server_recomputes": 0,
            "busy_refusals": 0,
            "false_refusals": 0,  # bad-request refusals of requests that another server then answered
        }
        self._busy_since: Optional[float] = None  # when the current streak of busy refusals began
        self._busy_streak = 0

    async def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        prompts: Optional[torch.Tensor],
        start: int,
        end: int,
        keep: bool,
    ) -> tuple[torch.Tensor, list[Hop]]:
        """Run blocks ``start..end-1``; ``prompts`` holds all blocks' deep prompts ``[B or 1, P * L, H]`` or None."""
        hops: list[Hop] = []
        block, failures, refusers = start, 0, []
        while block < end:
            span = await self.router.choose_span(block, end)
            request_id = uuid.uuid4().hex
            tensors = [hidden, attention_mask]
            sent = time.monotonic()
            try:
                (output,), _ = await self._call("forward", span, tensors, prompts, request_id, keep=keep)
            except Exception as e:
                if _busy(e):  # another replica, or this one later
                    await self.on_busy("forward", span, e)
                else:
                    failures = await self.on_failure("forward", span, failures, e, refusers)
                continue
            self.router.record_answer(span.peer_id, time.monotonic() - sent)
            self.on_answer(span, refusers)
            hops.append(Hop(span, hidden, request_id))
            hidden, block, failures, refusers = output, span.end, 0, []
        return hidden, hops

    async def backward(
        self,
        grad_outputs: torch.Tensor,
        attention_mask: torch.Tensor,
        prompts: Optional[torch.Tensor],
        hops: list[Hop],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Grads for the first hop's inputs and for ``prompts`` (zero outside the hops' blocks)."""
        hops = list(hops)
        grad_prompts = torch.zeros_like(prompts) if prompts is not None else None
        pre_seq_len = self._pre_seq_len(prompts)
        grad, failures, refusers = grad_outputs, 0, []
        while hops:
            hop = hops.pop()
            span = hop.span
            try:
                tensors = [hop.inputs, attention_mask, grad]
                grads, metadata = await self._call("backward", span, tensors, prompts, hop.request_id)
            except Exception as e:
                if _busy(e):  # the server keeps the graph: the same hop, later
                    await self.on_busy("backward", span, e)
                    hops.append(hop)
                    continue
                failures = await self.on_failure("backward", span, failures, e, refusers)
                self.stats["rerouted_backward_hops"] += 1
                _, new_hops = await self.forward(hop.inputs, attention_mask, prompts, span.start, span.end, keep=True)
                hops.extend(new_hops)
                continue
            self.on_answer(span, refusers)
            if metadata.get("recomputed"):
                self.stats["server_recomputes"] += 1
            grad, failures, refusers = grads[0], 0, []
            if grad_prompts is not None:
                grad_prompts[:, span.start * pre_seq_len : span.end * pre_seq_len] = grads[1]
        return grad, grad_prompts

    def _pre_seq_len(self, prompts: Optional[torch.Tensor]) -> int:
        return 0 if prompts is None else prompts.shape[1] // self.router.num_blocks

    async def _call(
        self,
        method: str,
        span: RemoteSpan,
        tensors: list[torch.Tensor],
        prompts: Optional[torch.Tensor],
        request_id: str,
        keep: bool = False,
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """One RPC to ``span``'s server; hidden-size tensors travel in the server's dtype (or the 16-bit
        ``wire_dtype``) and come back in ours."""
        dtype = tensors[0].dtype
        if self.settings.wire_dtype is not None:
            wire_dtype = HALF_WIRE_DTYPES[self.settings.wire_dtype]
        else:
            wire_dtype = WIRE_DTYPES.get(span.record.dtype, dtype)
        tensors = [t.to(wire_dtype) if t.is_floating_point() else t for t in tensors]
        pre_seq_len = self._pre_seq_len(prompts)
        metadata: dict[str, Any] = {"request_id": request_id, "pre_seq_len": pre_seq_len}
        if method == "forward":
            metadata["keep"] = keep
        if self.router.model is not None:
            metadata["model"] = self.router.model.to_dict()
        if prompts is not None:
            tensors.append(prompts[:, span.start * pre_seq_len : span.end * pre_seq_len])
        stub = BlockService.get_stub(self.p2p, span.peer_id)
        outputs, response = await call_server(
            stub,
            method,
            span_uid(self.router.prefix, span.start, span.end),
            tensors,
            metadata,
            timeout=self.settings.request_timeout,
            stream_threshold=self.settings.stream_threshold,
        )
        expected = [tensors[0]] + ([tensors[-1]] if method == "backward" and prompts is not None else [])
        check_outputs(str(span.peer_id), method, outputs, expected)
        outputs[0] = outputs[0].to(dtype)
        return outputs, response

    async def on_busy(self, method: str, span: RemoteSpan, error: RequestRefused) -> None:
        """Back off (with jitter, so that refused clients do not come back together) before the next try; a
        busy server is not failing, so it is not banned and the retries are not spent, up to ``busy_timeout``."""
        self.stats["busy_refusals"] += 1
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since, self._busy_streak = now, 0
        if now - self._busy_since > self.settings.busy_timeout:
            raise SwarmRequestError(
                f"servers refused the {method} through blocks {span.start}:{span.end} as busy for "
                f"{now - self._busy_since:.0f}s (busy_timeout); last: server {span.peer_id}: {error.message}"
            )
        self._busy_streak += 1
        delay = min(self.settings.backoff_base * 2 ** min(self._busy_streak - 1, 8), self.settings.backoff_max)
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))

    def on_answer(self, span: RemoteSpan, refusers: list["PeerID"]) -> None:
        """A server answered the hop: servers that refused it as a bad request lied, and stay banned."""
        self._busy_since = None
        self.router.on_success(span.peer_id)
        for peer in dict.fromkeys(refusers):
            self.stats["false_refusals"] += 1
            answered = "it then answered" if peer == span.peer_id else f"server {span.peer_id} answered: banned"
            logger.warning(f"server {peer} refused as a bad request what {answered}")

    async def on_failure(
        self, method: str, span: RemoteSpan, failures: int, error: Exception, refusers: Optional[list] = None
    ) -> int:
        """Ban the server (drop it from routing if it cannot be dialled), raise if the retries are spent or the
        request itself is bad, else back off (and re-read the DHT if every server of the block is banned).

        ``refusers``: the servers that refused this hop as a bad request so far (the hop's list, kept by the
        caller); a second refusal raises it (see the module's docstring), without it the first does."""
        if isinstance(error, RequestRefused) and error.kind == ErrorKind.BAD_REQUEST:
            if refusers is None or refusers:
                for peer in refusers or ():
                    self.router.on_success(peer)  # the request was bad: they told the truth
                raise RequestRefused(
                    error.kind,
                    f"server {span.peer_id} refused the {method} for blocks {span.start}:{span.end}: {error.message}",
                ) from None
            refusers.append(span.peer_id)
        self.stats["failed_calls"] += 1
        self.router.ban(span.peer_id)
        if await peer_unreachable(self.p2p, span.peer_id, error):
            # a certain verdict on that peer, found at once: no retry spent, no wait (records of peers that
            # never were online, e.g. a flood's, cost one failed dial each)
            self.router.mark_unreachable(span.peer_id)
            logger.warning(f"{method} via {span} failed ({type(error).__name__}: {error}); the peer is unreachable")
            return failures
        failures += 1
        if failures > self.settings.max_retries:
            raise SwarmRequestError(
                f"no server could run block {self.router.uids[span.start]}: {method} through blocks "
                f"{span.start}:{span.end} failed {failures} times in a row; "
                f"last error from server {span.peer_id}: {type(error).__name__}: {error}"
            ) from error
        delay = (
            0.0 if failures == 1 else min(self.settings.backoff_base * 2 ** (failures - 2), self.settings.backoff_max)
        )
        logger.warning(f"{method} via {span} failed ({type(error).__name__}: {error}); retrying in {delay:.1f}s")
        await asyncio.sleep(delay)
        if all(self.router.is_banned(peer) for peer in self.router.servers_for(span.start)):
            await self.router.refresh()  # the failed servers may have died: their records expire
        return failures


def _busy(error: Exception) -> bool:
    return isinstance(error, RequestRefused) and error.kind == ErrorKind.BUSY
