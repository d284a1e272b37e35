"""A block server: blocks ``start..end-1`` of one checkpoint, frozen, served to the swarm over hivemind.

Lifecycle: join the DHT and announce ``joining`` -> load only the span's weights -> measure throughput ->
register the RPCs and announce ``online`` (refreshed every ``refresh_period``) -> on stop announce
``offline``, fail queued work and shut down the p2p daemon. All work of all clients runs on one compute
thread through a :class:`FairQueue`; servers on one machine share its cores through :class:`HostCores`.

Example::

    server = BlockServer(path, 0, 2, initial_peers=initial_peers)  # blocks 0 and 1 of a checkpoint folder
    stop = asyncio.Event()
    await server.run(stop, on_online=lambda server: stop.set())  # serves until stop is set (here: once online)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from transformers import AutoConfig

from ptune_search.models.decoder_span import DecoderBlockSpan
from ptune_search.models.fingerprint import model_fingerprint
from ptune_search.models.registry import family_of
from ptune_search.swarm.protocol import (
    PROTOCOL_VERSION,
    BlockService,
    ServedModel,
    ServerRecord,
    ServerState,
    block_uids,
    model_prefix,
)
from ptune_search.swarm.record_bounds import RecordLimits, join_dht
from ptune_search.swarm.server.activation_cache import ActivationCache
from ptune_search.swarm.server.admission import InflightBudget
from ptune_search.swarm.server.announcer import ServerAnnouncer
from ptune_search.swarm.server.checks import ServedSpan
from ptune_search.swarm.server.fair_queue import FairQueue
from ptune_search.swarm.server.handlers import BlockRPCHandlers
from ptune_search.swarm.server.host_cores import HostCores
from ptune_search.swarm.server.settings import ServerSettings
from ptune_search.swarm.signed_records import PeerKey, SwarmRecordValidator

if TYPE_CHECKING:
    from hivemind.dht import DHTNode

logger = logging.getLogger(__name__)


class BlockServer:
    def __init__(
        self,
        model_path: str | Path,
        start: int,
        end: int,
        initial_peers: Sequence[str],
        settings: Optional[ServerSettings] = None,
    ):
        self.model_path = Path(model_path)
        self.settings = settings or ServerSettings()
        self.config = AutoConfig.from_pretrained(self.model_path)
        self.family = family_of(self.config.model_type, str(self.model_path))
        self.family.model_class.check_config(self.config)
        self.served_model = ServedModel(self.config.model_type, model_fingerprint(self.model_path))
        num_blocks = self.config.num_hidden_layers
        if not 0 <= start < end <= num_blocks:
            raise ValueError(f"blocks {start}:{end} are outside the model's 0:{num_blocks} ({self.model_path})")
        if not initial_peers:
            raise ValueError("a block server needs initial_peers: the multiaddrs of a bootstrap peer of the swarm")
        self.start, self.end, self.initial_peers = start, end, list(initial_peers)
        self.prefix = self.settings.dht_prefix or model_prefix(self.config)
        self.uids = block_uids(self.prefix, start, end)
        self.peer_id: Optional[str] = None
        self.maddrs: list[str] = []

    async def run(self, stop: asyncio.Event, on_online: Optional[Callable[["BlockServer"], None]] = None) -> None:
        """Serve until ``stop`` is set, then leave the swarm cleanly."""
        settings = self.settings
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        key, node = await self._join()
        self.peer_id = node.peer_id.to_base58()
        self.maddrs = [str(addr) for addr in await node.get_visible_maddrs()]
        announcer = ServerAnnouncer(
            node, self.uids, key.subkey, ttl=settings.record_ttl, refresh_period=settings.refresh_period
        )
        cores = HostCores(settings.compute_lock) if settings.compute_lock else None
        queue = FairQueue(
            settings.limits.max_queue,
            cores=cores,
            set_threads=torch.set_num_threads,
            threads=settings.num_threads,
            merge_limits=settings.merge,
        )
        record = ServerRecord(ServerState.JOINING, self.start, self.end, dtype=settings.dtype, model=self.served_model)
        expiry: Optional[asyncio.Task] = None
        try:
            await announcer.announce(record)
            announcer.start()
            loop = asyncio.get_running_loop()
            span = await loop.run_in_executor(None, self._load_span)
            throughput = await loop.run_in_executor(None, measure_throughput, span, settings.torch_dtype)
            queue.start()
            handlers = self._handlers(span, queue, throughput)
            expiry = asyncio.create_task(_expire_forever(handlers.cache))
            await BlockService().add_p2p_handlers(node.p2p, wrapper=handlers)
            await announcer.announce(dataclasses.replace(record, state=ServerState.ONLINE, throughput=throughput))
            logger.info(f"serving {self.uids[0]}..{self.uids[-1]} as peer {self.peer_id}")
            if on_online is not None:
                on_online(self)
            await stop.wait()
        finally:
            if expiry is not None:
                expiry.cancel()
            await announcer.stop(announce_offline=True)
            queue.close()
            if cores is not None:
                cores.close()
            await node.shutdown()
            logger.info(f"block server {self.peer_id} stopped")

    async def _join(self) -> tuple[PeerKey, "DHTNode"]:
        """Join the DHT with the server's key as its p2p identity and record signer (see signed_records)."""
        settings = self.settings
        options = dict(initial_peers=self.initial_peers, host_maddrs=[settings.listen.maddr])
        if settings.identity_file is not None:
            key = PeerKey.load_or_create(settings.identity_file)
            node = await join_dht(
                RecordLimits(), SwarmRecordValidator(key), **options, identity_path=str(settings.identity_file)
            )
            return key, node
        key = PeerKey()
        with tempfile.TemporaryDirectory(prefix="ptune-server-") as folder:  # p2pd reads it once, at start
            identity = Path(folder) / "identity"
            key.write_identity(identity)
            node = await join_dht(
                RecordLimits(),
                SwarmRecordValidator(key),
                **options,
                identity_path=str(identity),
                check_if_identity_free=False,
            )
        return key, node

    def _load_span(self) -> DecoderBlockSpan:
        started = time.perf_counter()
        span = self.family.span_class.from_checkpoint(
            self.model_path, self.config, self.start, self.end, self.settings.torch_dtype
        )
        logger.info(f"loaded blocks {self.start}:{self.end} in {time.perf_counter() - started:.1f}s")
        return span

    def _handlers(self, span: DecoderBlockSpan, queue: FairQueue, throughput: float) -> BlockRPCHandlers:
        settings = self.settings
        served = ServedSpan(
            self.prefix,
            self.start,
            self.end,
            self.config.hidden_size,
            settings.torch_dtype,
            settings.limits,
            self.served_model,
        )
        info = {
            "prefix": self.prefix,
            "start": self.start,
            "end": self.end,
            "hidden_size": self.config.hidden_size,
            "dtype": settings.dtype,
            "limits": settings.limits.to_dict(),
            "throughput": throughput,
            "version": PROTOCOL_VERSION,
            "model": self.served_model.to_dict(),
        }
        cache = ActivationCache(settings.graph_cache_bytes, settings.cache_max_age)
        budget = InflightBudget(
            settings.inflight_budget_bytes, settings.inflight_tokens, kept_bytes=lambda: cache.nbytes
        )
        return BlockRPCHandlers(span, served, queue, cache, budget, info)


async def _expire_forever(cache: ActivationCache) -> None:
    """Free the graphs of forwards whose backward never came, whether or not other requests arrive."""
    while True:
        await asyncio.sleep(cache.expiry_period)
        cache.expire()


def measure_throughput(span: DecoderBlockSpan, dtype: torch.dtype, tokens: int = 128) -> float:
    """Tokens per second of one forward through the whole span (the second of two runs)."""
    hidden = torch.randn(1, tokens, span.hidden_size, dtype=dtype)
    mask = torch.ones(1, tokens, dtype=torch.long)
    elapsed = float("inf")
    with torch.no_grad():
        for _ in range(2):
            started = time.perf_counter()
            span(hidden, mask)
            elapsed = time.perf_counter() - started
    return tokens / max(elapsed, 1e-9)
