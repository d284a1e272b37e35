"""Every setting of a block server, each declared once with its default and help text.

``swarm serve`` and ``swarm local`` take each setting as a flag derived from these fields (see
:mod:`ptune_search.swarm.setting_flags`); launchers pass a :class:`ServerSettings` to the server it runs::

    settings = ServerSettings(record_ttl=10.0, limits=RequestLimits(max_tokens=512))
    setting_flags(settings)   # ["--max-tokens", "512", "--record-ttl", "10.0"]
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ptune_search.swarm.protocol import RequestLimits
from ptune_search.swarm.server.fair_queue import MergeLimits
from ptune_search.swarm.setting_flags import setting

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ListenAddress:
    """Where a swarm process (a bootstrap peer or a block server) listens for its peers."""

    host: str = setting("127.0.0.1", help="address to listen on (on a cluster: this node's address)")
    port: int = setting(0, help="TCP port to listen on; 0 takes a free one")

    @property
    def maddr(self) -> str:
        return f"/ip4/{self.host}/tcp/{self.port}"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """How a block server runs; the defaults suit one machine. Times are in seconds."""

    dht_prefix: Optional[str] = setting(None, help="model name in the DHT (default: the model folder's name)")
    dtype: str = setting("float32", help="dtype the blocks are held and computed in", choices=DTYPES)
    num_threads: Optional[int] = setting(None, help="torch threads per server (default: torch's own choice)")
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)
    cache_bytes: Optional[int] = setting(
        None, help="memory for forward graphs kept for backward (default: a quarter of the machine's memory)"
    )
    cache_max_age: float = setting(600.0, help="seconds a forward graph waits for its backward before it is freed")
    inflight_bytes: Optional[int] = setting(
        None,
        flag="--max-inflight-bytes",
        help="requests in flight (payloads, answers) and kept graphs together; beyond it requests are refused as "
        "busy (default: the graphs' memory and 2 GiB)",
    )
    inflight_tokens: int = setting(
        256 * 1024, flag="--max-inflight-tokens", help="tokens of the requests in flight together"
    )
    merge: MergeLimits = dataclasses.field(default_factory=MergeLimits)  # requests of clients run as one batch
    record_ttl: float = setting(60.0, help="seconds a server's DHT records live")
    refresh_period: Optional[float] = setting(None, help="seconds between refreshes of the records (default: ttl / 3)")
    listen: ListenAddress = dataclasses.field(default_factory=ListenAddress)
    compute_lock: Optional[Path] = setting(
        None, help="lock-file prefix shared by the servers of this machine: they share its cores"
    )
    identity_file: Optional[Path] = setting(
        None, help="the server's key (libp2p identity, created if absent): a peer id that survives restarts"
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")

    @property
    def graph_cache_bytes(self) -> int:
        """``cache_bytes``, or a quarter of the machine's memory: a server holding all 30 blocks of SmolLM2-135M
        keeps about 0.6 GB of graphs per client training at batch 8 x 80 tokens, and a graph evicted before its
        backward costs a forward again (and, when merged, the whole batch's backward for each member)."""
        if self.cache_bytes is not None:
            return self.cache_bytes
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4

    @property
    def inflight_budget_bytes(self) -> int:
        """``inflight_bytes``, or the graph cache and 2 GiB for the payloads and answers in flight."""
        return self.inflight_bytes if self.inflight_bytes is not None else self.graph_cache_bytes + 2 * 1024**3

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)
