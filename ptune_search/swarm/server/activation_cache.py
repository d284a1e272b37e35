"""Forward graphs kept on a block server between a client's forward and its backward.

Petals' servers recompute a span's forward during backward; on a compute-bound machine that alone costs
about 1.5x a local step. A server here keeps the autograd graph of each training forward, keyed by
(client, request id), so the backward only runs the backward. The cache is bounded by the bytes the graphs
hold (measured with saved-tensor hooks, the frozen weights excluded) and by age; whatever was evicted, or
lost when a client re-routes, is recomputed from the inputs that every backward request carries.

Example::

    cache = ActivationCache(max_bytes=2**30, max_age=300)
    entry = CachedForward.run(lambda x, p: span(x, mask, p), hidden, prompts, weights=span_storages)
    cache.put(("peer", "req-1"), entry)
    ...
    entry = cache.pop(("peer", "req-1"))  # None if evicted: recompute
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Hashable, Optional

import torch


@dataclasses.dataclass
class CachedForward:
    inputs: torch.Tensor  # leaf, requires grad
    prompts: Optional[torch.Tensor]  # leaf, requires grad
    outputs: torch.Tensor  # carries the graph back to inputs and prompts
    nbytes: int
    created: float

    @classmethod
    def run(
        cls,
        fn: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
        inputs: torch.Tensor,
        prompts: Optional[torch.Tensor],
        weights: frozenset[int] = frozenset(),
    ) -> "CachedForward":
        """Run ``fn(inputs, prompts)`` with grad, counting the bytes its graph saves (``weights``: storages to skip)."""
        inputs = inputs.detach().requires_grad_(True)
        prompts = prompts.detach().requires_grad_(True) if prompts is not None else None
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer not in weights:
                seen[pointer] = storage.nbytes()
            return tensor

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = fn(inputs, prompts)
        nbytes = sum(seen.values()) + outputs.numel() * outputs.element_size()
        return cls(inputs, prompts, outputs, nbytes, time.monotonic())

    def backward(self, grad_outputs: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Grads for the inputs and the prompts; frees the graph."""
        wrt = [self.inputs] if self.prompts is None else [self.inputs, self.prompts]
        grads = torch.autograd.grad(self.outputs, wrt, grad_outputs=grad_outputs.to(self.outputs.dtype))
        return grads[0], (grads[1] if self.prompts is not None else None)


class ActivationCache:
    """LRU of :class:`CachedForward` bounded by ``max_bytes`` and ``max_age`` seconds."""

    def __init__(self, max_bytes: int, max_age: float = 300.0):
        self.max_bytes, self.max_age = max_bytes, max_age
        self._entries: collections.OrderedDict[Hashable, CachedForward] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Hashable, entry: CachedForward) -> bool:
        """Keep ``entry``, evicting the oldest ones to make room; False if it alone exceeds the budget."""
        with self._lock:
            self._drop(key)
            self._expire()
            if entry.nbytes > self.max_bytes:
                return False
            while self._entries and self._bytes + entry.nbytes > self.max_bytes:
                self._evict_oldest()
            self._entries[key] = entry
            self._bytes += entry.nbytes
            return True

    def pop(self, key: Hashable) -> Optional[CachedForward]:
        with self._lock:
            entry = self._drop(key)
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
            return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: Hashable) -> Optional[CachedForward]:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes
        return entry

    def _evict_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self._bytes -= entry.nbytes
        self.evictions += 1

    def _expire(self) -> None:
        deadline = time.monotonic() - self.max_age
        while self._entries and next(iter(self._entries.values())).created < deadline:
            self._evict_oldest()
