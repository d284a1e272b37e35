"""Requests of several clients through one block span as one batch, split again, forward and backward.

Concurrent trials send the same server requests that differ in batch, length, ``pre_seq_len`` and deep
prompts. On a CPU the blocks' matrix products run faster on one batch of all their rows than on each request
in turn, so the server stacks the requests' rows: hidden states right-padded to the longest request (a
right-padded position changes no earlier position, as the mask is causal), attention masks padded with 0,
and the deep prompts of each request laid out for the longest ``pre_seq_len`` with zeros elsewhere (adding
zero changes nothing). Each request's hidden states and prompts stay leaves of their own, so its output and
its grads are slices of the batch's, equal to a pass of the request alone up to float rounding.

A training forward keeps its graph for the backwards that follow (see :class:`ActivationCache`): each
request gets a :class:`MemberForward` in the cache that points to the shared :class:`MergedForward`. A
backward needs only its own request: the backwards of members that wait together run as one pass, the graph
is kept (``retain_graph``) while other members may still come, and a member whose entry was lost is
recomputed from the inputs it carries, merged with the other lost ones.

Example::

    def span_fn(hidden, attention_mask, deep_prompts):  # the span's blocks; a toy one here
        return hidden * 2

    def request(batch, length):
        hidden, mask = torch.randn(batch, length, 8), torch.ones(batch, length)
        return SpanRequest(0, 1, hidden, mask, None, None, "r", keep_activations=True, wire_dtype=torch.float32)

    merged = MergedForward.run(span_fn, [request(2, 5), request(1, 3)], num_blocks=1, grad=True)
    out_a, out_b = merged.output(0), merged.output(1)  # [2, 5, 8] and [1, 3, 8]
    [(grad_hidden_b, grad_prompts_b)] = merged.backward([1], [torch.ones_like(out_b)])  # b's own grads
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ptune_search.swarm.server.checks import SpanRequest

SpanFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
"""``span_fn(hidden [B, T, H], attention_mask [B, T], deep_prompts [B, P * n, H] or None)``: the blocks' output."""

Grads = tuple[torch.Tensor, Optional[torch.Tensor]]


class MergedForward:
    """The rows of ``requests`` run through a span as one batch (all for the same blocks)."""

    def __init__(
        self,
        inputs: list[torch.Tensor],
        prompts: list[Optional[torch.Tensor]],
        outputs: torch.Tensor,
        row_starts: list[int],
        nbytes: int,
    ):
        self.inputs, self.prompts, self.outputs = inputs, prompts, outputs
        self.row_starts, self.nbytes = row_starts, nbytes
        self.outstanding = set(range(len(inputs)))  # members whose backward has not run yet

    @classmethod
    def run(
        cls,
        span_fn: SpanFn,
        requests: Sequence[SpanRequest],
        num_blocks: int,
        *,
        grad: bool,
        weights: frozenset[int] = frozenset(),
    ) -> "MergedForward":
        """Run ``requests`` (blocks of ``num_blocks``) as one batch; with ``grad``, keep the graph and count
        the bytes it saves (storages in ``weights``, the frozen parameters, excluded)."""
        inputs = [r.hidden.detach().requires_grad_(grad) for r in requests]
        prompts = [None if r.prompts is None else r.prompts.detach().requires_grad_(grad) for r in requests]
        length = max(r.hidden.shape[1] for r in requests)
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
            # Detached: a saved output kept as itself would hold its own grad_fn, a cycle through C++ that no
            # gc breaks, so a graph evicted before its backward would never be freed (autograd re-attaches it).
            return tensor.detach()

        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            hidden = torch.cat([F.pad(x, (0, 0, 0, length - x.shape[1])) for x in inputs])
            masks = [r.attention_mask.to(torch.long) for r in requests]
            mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks])
            deep = _stack_prompts(requests, prompts, num_blocks, hidden.dtype)
            outputs = span_fn(hidden, mask, deep)
        row_starts = [0]
        for x in inputs:
            row_starts.append(row_starts[-1] + x.shape[0])
        nbytes = sum(seen.values()) + outputs.numel() * outputs.element_size()
        return cls(inputs, prompts, outputs, row_starts, nbytes)

    def __len__(self) -> int:
        return len(self.inputs)

    def output(self, member: int) -> torch.Tensor:
        """Member ``member``'s output ``[B, T, H]``, detached."""
        rows = slice(self.row_starts[member], self.row_starts[member + 1])
        return self.outputs[rows, : self.inputs[member].shape[1]].detach()

    def member_bytes(self, member: int) -> int:
        """The share of the graph's bytes that member ``member``'s tokens account for."""
        tokens = [x.shape[0] * x.shape[1] for x in self.inputs]
        return self.nbytes * tokens[member] // max(sum(tokens), 1)

    def backward(self, members: Sequence[int], grad_outputs: Sequence[torch.Tensor]) -> list[Grads]:
        """Grads for the hidden states and prompts of ``members``, given their output grads, in one pass.

        The graph is kept while other members have not had their backward; it frees with the last one.
        """
        full = torch.zeros_like(self.outputs)
        for member, grad in zip(members, grad_outputs):
            rows = slice(self.row_starts[member], self.row_starts[member + 1])
            full[rows, : grad.shape[1]] = grad.to(full.dtype)
        self.outstanding.difference_update(members)
        wrt = [self.inputs[m] for m in members] + [self.prompts[m] for m in members if self.prompts[m] is not None]
        grads = list(torch.autograd.grad(self.outputs, wrt, grad_outputs=full, retain_graph=bool(self.outstanding)))
        grad_inputs, grad_prompts = grads[: len(members)], iter(grads[len(members) :])
        return [(g, None if self.prompts[m] is None else next(grad_prompts)) for m, g in zip(members, grad_inputs)]


@dataclasses.dataclass
class MemberForward:
    """What the activation cache keeps for one request of a merged training forward."""

    merged: MergedForward
    member: int
    nbytes: int
    created: float = dataclasses.field(default_factory=time.monotonic)

    def fits(self, request: SpanRequest) -> bool:
        """A kept graph serves a backward only if it was built from inputs of the same shapes."""
        prompts = self.merged.prompts[self.member]
        same_prompts = (prompts is None and request.prompts is None) or (
            prompts is not None and request.prompts is not None and prompts.shape == request.prompts.shape
        )
        return self.merged.inputs[self.member].shape == request.hidden.shape and same_prompts


def _stack_prompts(
    requests: Sequence[SpanRequest],
    prompts: Sequence[Optional[torch.Tensor]],
    num_blocks: int,
    dtype: torch.dtype,
) -> Optional[torch.Tensor]:
    """Deep prompts of all rows ``[sum B, P_max * n, H]``: block ``i``'s rows at ``i * P_max``, each request's
    first ``P`` of them its own prompts, the rest zero; None if no request has deep prompts."""
    lengths = [0 if p is None else p.shape[1] // num_blocks for p in prompts]
    longest = max(lengths)
    if not longest:
        return None
    size = requests[0].hidden.shape[2]
    rows = []
    for request, prompt, length in zip(requests, prompts, lengths):
        batch = request.hidden.shape[0]
        if prompt is None:
            rows.append(torch.zeros(batch, longest * num_blocks, size, dtype=dtype))
            continue
        per_block = prompt.to(dtype).view(prompt.shape[0], num_blocks, length, size).expand(batch, -1, -1, -1)
        rows.append(F.pad(per_block, (0, 0, 0, longest - length)).reshape(batch, longest * num_blocks, size))
    return torch.cat(rows)
