"""Forward graphs kept on a block server between a client's forward and its backward.

Petals' servers recompute a span's forward during backward; on a compute-bound machine that alone costs
about 1.5x a local step. A server here keeps the autograd graph of each training forward, keyed by
(client, request id), so the backward only runs the backward. The cache is bounded by the bytes the graphs
hold (measured with saved-tensor hooks, the frozen weights excluded) and by age; whatever was evicted, or
lost when a client re-routes, is recomputed from the inputs that every backward request carries.

Example::

    import torch

    from ptune_search.swarm.server.merged_pass import MemberForward, MergedForward

    merged = MergedForward(inputs=[], prompts=[], outputs=torch.zeros(0), row_starts=[0], nbytes=0)  # a pass
    cache = ActivationCache(max_bytes=2**30, max_age=300)
    cache.put(("peer", "req-1"), MemberForward(merged, member=0, nbytes=2**20))  # any KeptForward
    ...
    entry = cache.pop(("peer", "req-1"))  # None if evicted: recompute
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Hashable, Optional, Protocol


class KeptForward(Protocol):
    """A forward graph kept for a backward (e.g. merged_pass.MemberForward)."""

    nbytes: int  # what the graph holds, frozen weights excluded
    created: float  # time.monotonic() when it was made


class ActivationCache:
    """LRU of :class:`KeptForward` bounded by ``max_bytes`` and ``max_age`` seconds."""

    def __init__(self, max_bytes: int, max_age: float):
        self.max_bytes, self.max_age = max_bytes, max_age
        self._entries: collections.OrderedDict[Hashable, KeptForward] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def expiry_period(self) -> float:
        """How often :meth:`expire` should run: entries then live at most 1.25 ``max_age``."""
        return self.max_age / 4

    def expire(self) -> None:
        """Drop the entries older than ``max_age``."""
        with self._lock:
            self._expire()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Hashable, entry: KeptForward) -> bool:
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

    def pop(self, key: Hashable) -> Optional[KeptForward]:
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

    def _drop(self, key: Hashable) -> Optional[KeptForward]:
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
