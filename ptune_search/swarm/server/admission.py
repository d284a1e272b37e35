"""A block server's memory bounded as a whole: bytes and tokens of all requests in flight, kept graphs included.

Each request holds a :class:`Ticket` from its first received byte until its answer is written. A ticket grows
with what the request brings: the bytes of its payload as they arrive (twice: what came, and the answer of the
same size that goes back), then its tokens once its shape is known, with the memory its computation takes:
tokens times the largest graph bytes per token measured so far (:attr:`InflightBudget.graph_bytes_per_token`,
updated by every kept forward; before the first, ``initial_graph_bytes_per_token``, 0 by default: until a
server has kept one graph, requests count their payloads only). Growing past the budget, counting the
activation cache's kept graphs with the requests in flight, is refused with ``busy``: the client retries on
another replica or after a backoff. A request alone in flight is always admitted, so a server with a budget
smaller than one request still makes progress (each request is bounded by the request limits anyway).

Example::

    budget = InflightBudget(max_bytes=2**20, max_tokens=4096, kept_bytes=lambda: 0)
    with budget.ticket() as ticket:
        ticket.add(nbytes=2 * 600_000)                  # alone in flight: admitted even beyond the budget
        with budget.ticket() as other:
            try:
                other.add(nbytes=1)                     # over the budget with another request in flight
            except RequestRefused as refusal:
                assert refusal.kind == ErrorKind.BUSY
    assert budget.bytes == 0 and budget.refused == 1
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from ptune_search.swarm.protocol import ErrorKind, RequestRefused


class InflightBudget:
    def __init__(
        self,
        max_bytes: int,
        max_tokens: int,
        kept_bytes: Callable[[], int] = lambda: 0,
        initial_graph_bytes_per_token: float = 0.0,
    ):
        if max_bytes <= 0 or max_tokens <= 0:
            raise ValueError(f"an in-flight budget must be > 0 (got {max_bytes} bytes, {max_tokens} tokens)")
        self.max_bytes, self.max_tokens, self.kept_bytes = max_bytes, max_tokens, kept_bytes
        self.graph_bytes_per_token = initial_graph_bytes_per_token
        self.bytes = self.tokens = self.tickets = 0
        self.refused = 0
        self.peak_bytes = 0

    @contextlib.contextmanager
    def ticket(self) -> Iterator["Ticket"]:
        ticket = Ticket(self)
        self.tickets += 1
        try:
            yield ticket
        finally:
            self.tickets -= 1
            self.bytes -= ticket.bytes
            self.tokens -= ticket.tokens

    def stats(self) -> dict[str, int]:
        return {
            "bytes": self.bytes,
            "tokens": self.tokens,
            "requests": self.tickets,
            "refused": self.refused,
            "peak_bytes": self.peak_bytes,
            "graph_bytes_per_token": round(self.graph_bytes_per_token),
        }


class Ticket:
    """What one request holds of its server's :class:`InflightBudget`."""

    def __init__(self, budget: InflightBudget):
        self.budget = budget
        self.bytes = self.tokens = 0

    def add(self, nbytes: int = 0, tokens: int = 0) -> None:
        budget = self.budget
        alone = budget.bytes == self.bytes and budget.tokens == self.tokens
        over_bytes = budget.bytes + nbytes + budget.kept_bytes() > budget.max_bytes
        over_tokens = budget.tokens + tokens > budget.max_tokens
        if (over_bytes or over_tokens) and not alone:
            budget.refused += 1
            raise RequestRefused(
                ErrorKind.BUSY,
                f"the server is busy: {budget.tickets} requests in flight hold {budget.bytes} bytes and "
                f"{budget.tokens} tokens, kept graphs {budget.kept_bytes()} bytes (budget {budget.max_bytes} bytes, "
                f"{budget.max_tokens} tokens); retry on another replica or later",
            )
        self.bytes += nbytes
        self.tokens += tokens
        budget.bytes += nbytes
        budget.tokens += tokens
        budget.peak_bytes = max(budget.peak_bytes, budget.bytes + budget.kept_bytes())
