"""A block server's records in the DHT: one per block, under the server's signed subkey (see signed_records).

The server announces ``joining`` before it loads weights, ``online`` once it serves, refreshes the record
every ``refresh_period`` seconds, and announces ``offline`` when it stops. Every record expires ``ttl``
seconds after it was stored, so a server that dies without a word vanishes from routing within ``ttl``.

Example (inside the server's event loop)::

    announcer = ServerAnnouncer(node, block_uids("m", 0, 4), key.subkey, ttl=60)
    await announcer.announce(ServerRecord(ServerState.JOINING, 0, 4))
    announcer.start()                  # keeps refreshing the latest record
    await announcer.stop()             # stores an "offline" record
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING, Optional, Sequence

from hivemind.utils import get_dht_time

from ptune_search.swarm.protocol import ServerRecord, ServerState

if TYPE_CHECKING:
    from hivemind.dht import DHTNode

logger = logging.getLogger(__name__)


class ServerAnnouncer:
    def __init__(
        self,
        node: "DHTNode",
        uids: Sequence[str],
        subkey: str,
        ttl: float,
        refresh_period: Optional[float] = None,
    ):
        if ttl <= 0:
            raise ValueError(f"record ttl must be > 0 seconds (got {ttl})")
        self.node, self.uids, self.subkey, self.ttl = node, list(uids), subkey, ttl
        self.refresh_period = refresh_period if refresh_period is not None else ttl / 3
        self.record: Optional[ServerRecord] = None
        self._task: Optional[asyncio.Task] = None

    async def announce(self, record: Optional[ServerRecord] = None) -> bool:
        """Store ``record`` (or the latest one again) under every block; True if every store succeeded."""
        if record is not None:
            self.record = record
        if self.record is None:
            raise ValueError("nothing to announce yet: pass a ServerRecord")
        results = await self.node.store_many(
            keys=self.uids,
            values=[self.record.to_dict()] * len(self.uids),
            expiration_time=get_dht_time() + self.ttl,
            subkeys=[self.subkey] * len(self.uids),
        )
        return all(results.values())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_period)
            try:
                if not await self.announce():
                    logger.warning("some block records could not be stored in the DHT; retrying next period")
            except Exception as e:  # noqa: BLE001 - a failed refresh must not stop the next one
                logger.warning(f"refreshing block records failed: {e!r}")

    async def stop(self, announce_offline: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if announce_offline and self.record is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.announce(dataclasses.replace(self.record, state=ServerState.OFFLINE)), timeout=5
                )
