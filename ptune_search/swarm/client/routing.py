"""Which server runs which blocks: server records from the DHT, spans, replicas and bans.

A client asks :meth:`BlockRouter.choose_span` for a server holding block ``i``; it gets the span that server
covers from ``i`` on (at most up to ``end``), chosen at random among online, non-banned replicas with weight
proportional to how many blocks the span covers (fewer hops) over the square of the seconds its server took
to answer this client's forwards lately (:meth:`BlockRouter.record_answer`: a moving average of round trip,
queue and compute together). A far, lossy or loaded replica is then chosen rarely but not never, and equal
replicas share the load evenly; a server measured long ago, or never, counts as fast as the fastest, so a
healed or new one is tried again. If no server is
online for block ``i``, it waits up to ``block_wait_timeout`` seconds, re-reading the DHT, then raises
:class:`MissingBlockError` naming the block.

Records are signed (see :mod:`~ptune_search.swarm.signed_records`): a record counts only under the subkey of
the key that signed it, for that key's peer, so nobody can write for another server. What a peer signs for
itself may still be garbage: records that are unsigned, malformed, whose span does not contain the block they
are stored under, or (with ``trusted_servers``) of a peer not in that list are skipped with a warning. Records
that lie plausibly (an online record of a peer that serves nothing) are found out by the calls that fail on
them: the client bans that peer and re-routes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import TYPE_CHECKING, Optional, Sequence

from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.protocol import (
    PROTOCOL_VERSION,
    ServedModel,
    ServerRecord,
    ServerState,
    block_uid,
    parse_block_uid,
)
from ptune_search.swarm.signed_records import owner_peer_id

if TYPE_CHECKING:
    from hivemind.dht import DHTNode
    from hivemind.p2p import PeerID

logger = logging.getLogger(__name__)
MAX_REPORTED = 1024  # bad records remembered as already reported (then forgotten, so reported again)
ANSWER_WEIGHT = 0.3  # of the latest answer time in a server's moving average
ANSWER_MEMORY_S = 60.0  # an answer time older than this no longer counts


class MissingBlockError(RuntimeError):
    """No server is online for a block of the model."""

    def __init__(self, uid: str, index: int, waited: float, joining: bool):
        hint = (
            "a server for it is still joining (loading weights); wait longer (block_wait_timeout)"
            if joining
            else f"start a server for it: `ptune-search swarm serve --model PATH --blocks {index}:{index + 1} "
            "--initial-peers ...`"
        )
        super().__init__(f"no server is online for block {uid} (block {index}) after waiting {waited:.1f}s; {hint}")
        self.uid, self.index, self.waited, self.joining = uid, index, waited, joining

    def __reduce__(self) -> tuple:
        """Rebuilt from its fields when copied or pickled (Ray does both to a trial's exception)."""
        return type(self), (self.uid, self.index, self.waited, self.joining)


class ModelMismatchError(RuntimeError):
    """The only servers of a block serve another model (family or checkpoint) than the client's."""

    def __init__(self, uid: str, theirs: ServedModel, ours: ServedModel):
        super().__init__(
            f"the servers of block {uid} serve {theirs}, but this client loaded {ours}: start servers with the "
            "client's checkpoint, or give the client the DHT prefix of a swarm of its own model (dht_prefix)"
        )
        self.uid, self.theirs, self.ours = uid, theirs, ours

    def __reduce__(self) -> tuple:
        """Rebuilt from its fields when copied or pickled (Ray does both to a trial's exception)."""
        return type(self), (self.uid, self.theirs, self.ours)


@dataclasses.dataclass(frozen=True)
class RemoteSpan:
    """Blocks ``start..end-1`` on the server ``peer_id``."""

    peer_id: "PeerID"
    start: int
    end: int
    record: ServerRecord

    @property
    def length(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}@{str(self.peer_id)[-6:]}"


async def fetch_block_records(
    node: "DHTNode",
    uids: Sequence[str],
    reported: Optional[set[tuple[str, str]]] = None,
    trusted: Optional[frozenset[str]] = None,
    expirations: Optional[dict["PeerID", float]] = None,
) -> list[dict["PeerID", ServerRecord]]:
    """For each block uid, the latest record of every server that announced it (any state).

    Unsigned and malformed records, records whose span does not contain the uid's block and, with ``trusted``
    (base58 peer ids), records of other peers are skipped with a WARNING; with ``reported``, only once per uid
    and subkey (the set remembers what was reported). ``expirations`` gets each peer's latest record expiry.
    """
    found = await node.get_many(list(uids), sufficient_expiration_time=float("inf"))
    result: list[dict["PeerID", ServerRecord]] = []
    for uid in uids:
        entry = found.get(uid)
        if entry is None:
            result.append({})
        elif not isinstance(entry.value, dict):
            kind = type(entry.value).__name__
            _report(reported, uid, "", f"ignoring the value under {uid}: a {kind}, not a map of server records")
            result.append({})
        else:
            result.append(_parse_records(uid, entry.value, reported, trusted, expirations))
    return result


def _parse_records(
    uid: str,
    value: dict,
    reported: Optional[set[tuple[str, str]]],
    trusted: Optional[frozenset[str]],
    expirations: Optional[dict["PeerID", float]],
) -> dict["PeerID", ServerRecord]:
    _, index = parse_block_uid(uid)
    servers: dict["PeerID", ServerRecord] = {}
    for subkey, item in value.items():
        try:
            peer = owner_peer_id(subkey)
            if trusted is not None and peer.to_base58() not in trusted:
                raise ValueError(f"peer {peer} is not in trusted_servers")
            record = ServerRecord.from_dict(item.value)
            if not record.covers(index):
                raise ValueError(f"its span {record.start}:{record.end} does not contain block {index}")
        except Exception as e:  # noqa: BLE001 - other peers' garbage must not break routing
            _report(reported, uid, repr(subkey)[:80], f"ignoring the record of {repr(subkey)[:80]} under {uid}: {e}")
            continue
        servers[peer] = record
        if expirations is not None:
            expirations[peer] = max(expirations.get(peer, -float("inf")), item.expiration_time)
    return servers


def _report(reported: Optional[set[tuple[str, str]]], uid: str, subkey: str, message: str) -> None:
    if reported is not None:
        if (uid, subkey) in reported:
            return
        if len(reported) >= MAX_REPORTED:
            reported.clear()
        reported.add((uid, subkey))
    logger.warning(message)


class BlockRouter:
    def __init__(
        self,
        node: "DHTNode",
        prefix: str,
        num_blocks: int,
        settings: ClientConfig,
        *,
        model: Optional[ServedModel] = None,
    ):
        """With ``settings.trusted_servers`` (base58 peer ids), only these servers are used (a private swarm).
        ``model``: the client's; servers that announce another one are not used."""
        self.node, self.prefix, self.num_blocks, self.model = node, prefix, num_blocks, model
        trusted = settings.trusted_servers
        self.trusted = frozenset(trusted) if trusted is not None else None
        self.uids = [block_uid(prefix, index) for index in range(num_blocks)]
        self.update_period = settings.route_update_period
        self.ban_timeout, self.block_wait_timeout = settings.ban_timeout, settings.block_wait_timeout
        self._online: list[dict["PeerID", ServerRecord]] = [{} for _ in range(num_blocks)]
        self._joining: list[bool] = [False] * num_blocks
        self._foreign: list[Optional[ServedModel]] = [None] * num_blocks  # another model online for the block
        self._updated = -float("inf")
        self._bans: dict["PeerID", tuple[float, int]] = {}  # peer -> (banned until, consecutive failures)
        self._expirations: dict["PeerID", float] = {}  # peer -> when its latest record expires
        self._unreachable: dict["PeerID", float] = {}  # peer -> the expiry of its records when it was found dead
        self._reported: set[tuple[str, str]] = set()  # bad records already warned about
        self._answer_s: dict["PeerID", tuple[float, float]] = {}  # peer -> (moving average seconds, measured at)
        self._refresh_lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._refresh_lock:
            expirations: dict["PeerID", float] = {}
            records = await fetch_block_records(self.node, self.uids, self._reported, self.trusted, expirations)
            self._expirations = expirations
            for peer, dead_expiry in list(self._unreachable.items()):
                if expirations.get(peer, -float("inf")) > dead_expiry:  # it announced itself since: alive again
                    del self._unreachable[peer]
            usable = [
                {peer: r for peer, r in servers.items() if _usable(r) and peer not in self._unreachable}
                for servers in records
            ]
            self._online = [{peer: r for peer, r in servers.items() if self._ours(r)} for servers in usable]
            self._foreign = [next((r.model for r in servers.values() if not self._ours(r)), None) for servers in usable]
            self._joining = [any(r.state == ServerState.JOINING for r in servers.values()) for servers in records]
            self._updated = time.monotonic()

    def servers_for(self, block: int) -> dict["PeerID", ServerRecord]:
        """Online servers of ``block`` as of the last refresh."""
        return dict(self._online[block])

    async def choose_span(self, block: int, end: Optional[int] = None) -> RemoteSpan:
        end = self.num_blocks if end is None else end
        if not 0 <= block < end <= self.num_blocks:
            raise ValueError(f"no blocks to route in {block}:{end} (the model has {self.num_blocks})")
        started = time.monotonic()
        delay = 0.25
        if time.monotonic() - self._updated > self.update_period:
            await self.refresh()
        while True:
            candidates = self._candidates(block, end)
            if candidates:
                return random.choices(candidates, weights=self._weights(candidates))[0]
            if self._foreign[block] is not None and not self._online[block] and not self._joining[block]:
                raise ModelMismatchError(self.uids[block], self._foreign[block], self.model)
            waited = time.monotonic() - started
            if waited >= self.block_wait_timeout:
                raise MissingBlockError(self.uids[block], block, waited, self._joining[block])
            await asyncio.sleep(min(delay, self.block_wait_timeout - waited))
            delay = min(2 * delay, 2.0)
            await self.refresh()

    def _ours(self, record: ServerRecord) -> bool:
        return self.model is None or record.model is None or record.model == self.model

    def _candidates(self, block: int, end: int) -> list[RemoteSpan]:
        spans = []
        for peer, record in self._online[block].items():
            reach = block + 1
            while reach < min(end, record.end) and peer in self._online[reach]:
                reach += 1
            spans.append(RemoteSpan(peer, block, reach, record))
        now = time.monotonic()
        allowed = [span for span in spans if self._bans.get(span.peer_id, (0.0, 0))[0] <= now]
        if allowed or not spans:
            return allowed
        # Every server is banned: the failures may be ours, so try again those that failed least often.
        fewest = min(self._bans.get(span.peer_id, (0.0, 0))[1] for span in spans)
        return [span for span in spans if self._bans.get(span.peer_id, (0.0, 0))[1] == fewest]

    def ban(self, peer_id: "PeerID") -> None:
        """Avoid ``peer_id`` for ``ban_timeout`` seconds, doubling with each consecutive failure (up to 8x)."""
        _, failures = self._bans.get(peer_id, (0.0, 0))
        duration = self.ban_timeout * 2 ** min(failures, 3)
        self._bans[peer_id] = (time.monotonic() + duration, failures + 1)
        logger.info(f"banning server {peer_id} for {duration:.0f}s")

    def mark_unreachable(self, peer_id: "PeerID") -> None:
        """Route no more to ``peer_id`` (its connection was refused) until it stores records again.

        A server that died leaves records that live on until they expire (the record ttl); this drops it at once.
        """
        self._unreachable[peer_id] = self._expirations.get(peer_id, -float("inf"))
        for servers in self._online:
            servers.pop(peer_id, None)
        logger.info(f"server {peer_id} is unreachable: not routed to until it announces itself again")

    def on_success(self, peer_id: "PeerID") -> None:
        self._bans.pop(peer_id, None)

    def record_answer(self, peer_id: "PeerID", seconds: float) -> None:
        """``peer_id`` answered a forward in ``seconds`` (sent to received: the round trip, its queue, compute)."""
        now = time.monotonic()
        average, at = self._answer_s.get(peer_id, (seconds, now))
        if now - at > ANSWER_MEMORY_S:
            average = seconds
        self._answer_s[peer_id] = ((1 - ANSWER_WEIGHT) * average + ANSWER_WEIGHT * seconds, now)

    def _weights(self, spans: Sequence[RemoteSpan]) -> list[float]:
        """``length / seconds ** 2`` per span (see the module's docstring); ``length`` while nothing is known."""
        now = time.monotonic()
        recent = {p: s for p, (s, at) in self._answer_s.items() if now - at <= ANSWER_MEMORY_S and s > 0}
        known = [recent[span.peer_id] for span in spans if span.peer_id in recent]
        if not known:
            return [float(span.length) for span in spans]
        fastest = min(known)
        return [span.length / recent.get(span.peer_id, fastest) ** 2 for span in spans]

    def is_banned(self, peer_id: "PeerID") -> bool:
        return self._bans.get(peer_id, (0.0, 0))[0] > time.monotonic()


def _usable(record: ServerRecord) -> bool:
    """Online and speaking our protocol version (other versions may change what requests mean)."""
    return record.state == ServerState.ONLINE and record.version == PROTOCOL_VERSION
