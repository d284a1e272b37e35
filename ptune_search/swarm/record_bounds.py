"""Bounds on what a DHT node of the swarm stores and reads, so that a flood of signed records cannot exhaust it.

Signing (:mod:`~ptune_search.swarm.signed_records`) makes records unforgeable, not scarce: anyone can make a
fresh key for each record and store thousands of valid subkeys under a block's key (subkey flooding). Every
DHT node of the swarm (bootstrap peers, servers, clients) joins through :func:`join_dht`, which bounds it by
a :class:`RecordLimits`:

- Each record: a value of at most ``max_record_bytes``, expiring at most ``max_ttl`` seconds ahead (so a
  flooder cannot pin its records for ever); others are refused, on store and on read.
- Per key: at most ``max_subkeys_per_key`` records stored. A value read from another node with more records
  under one key is refused whole before any signature is checked (an honest node never holds more).
- Per peer: a record is *first-hand* when the peer that stores it is the record's owner (a server storing its
  own record), *relayed* otherwise. One peer may have at most ``max_relayed_per_key`` relayed records under a
  key here and ``max_relayed_per_peer`` in all. When a key or the node is full, a first-hand record takes
  the place of a relayed one: servers' own records always find room, and a flood from one peer takes a few.
- In all: at most ``max_records`` records.
- No cache: hivemind's DHT cache answers lookups instead of the storage whenever its value expires later,
  so a flood into it could hide the servers' records; the swarm reads with full traversals and gains
  nothing from a cache, so nodes keep none and refuse what others ask them to cache.

Records relayed by an honest peer (hivemind hands its records to a node that joins) are capped like any
other relay; the servers store their records first-hand at the next refresh (``record_ttl / 3``).

A node joins with ``await join_dht(limits, validator, initial_peers=..., host_maddrs=...)``; what it may hold
at most follows from its limits alone. Example::

    limits = RecordLimits()
    assert limits.memory_bound() < 64 * 1024**2
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from ptune_search.swarm.signed_records import MAX_SUBKEY_CHARS, owner_peer_id

if TYPE_CHECKING:
    from hivemind.dht import DHTNode
    from hivemind.p2p import PeerID

logger = logging.getLogger(__name__)
RECORD_OVERHEAD_BYTES = 1024  # Python objects around a stored record: entry, expiry, heap entries, relay index
REPORT_PERIOD = 60.0  # seconds between warnings about refused records of one kind
_STORING_PEER: contextvars.ContextVar[Optional["PeerID"]] = contextvars.ContextVar("storing_peer", default=None)


@dataclasses.dataclass(frozen=True)
class RecordLimits:
    """What one DHT node stores and reads (see the module's docstring); the defaults suit swarms of up to a
    few hundred servers per block."""

    max_subkeys_per_key: int = 256
    max_relayed_per_key: int = 8
    max_relayed_per_peer: int = 1024
    max_records: int = 8192
    max_record_bytes: int = 2048
    max_ttl: float = 3600.0

    def memory_bound(self) -> int:
        """Bytes the stored records can take at most: each record's value, subkey and Python objects."""
        return self.max_records * (self.max_record_bytes + MAX_SUBKEY_CHARS + RECORD_OVERHEAD_BYTES)


class RecordSizeValidator(RecordValidatorBase):
    """Refuses records whose value is larger than ``max_record_bytes`` or that expire beyond ``max_ttl``."""

    def __init__(self, limits: RecordLimits):
        self.limits = limits
        self._warnings = _Warnings()

    @property
    def priority(self) -> int:
        return 20  # before the signature checks (priority 10): a flood of large values costs no RSA

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > self.limits.max_record_bytes:
            self._warnings.warn("size", f"refusing DHT records larger than {self.limits.max_record_bytes} bytes")
            return False
        if record.expiration_time > get_dht_time() + self.limits.max_ttl:
            self._warnings.warn("ttl", f"refusing DHT records that expire more than {self.limits.max_ttl:g}s ahead")
            return False
        return True


class BoundedRecordStorage(DHTLocalStorage):
    """A node's DHT storage within :class:`RecordLimits`; it knows who stores a record from :func:`join_dht`."""

    def __init__(self, limits: RecordLimits):
        super().__init__()
        self.limits = limits
        self.count = 0  # records stored; may include some that expired since (recounted when it matters)
        self._relays: dict[DHTID, dict[Any, "PeerID"]] = {}  # key -> relayed subkey -> the peer that relayed it
        self._per_peer: dict["PeerID", int] = {}  # relayed records per peer
        self._recounted = -float("inf")
        self._warnings = _Warnings()

    def store(self, key: DHTID, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        if subkey is None:  # the swarm stores records under subkeys only (whole values are refused)
            return False
        return self.store_subkey(key, subkey, value, expiration_time)

    def store_subkey(self, key: DHTID, subkey: Any, value: bytes, expiration_time: float) -> bool:
        entries = self._entries(key)
        if entries is not None and subkey in entries.data:  # a refresh takes no new room
            return super().store_subkey(key, subkey, value, expiration_time)
        relayer = _relayer(subkey)
        if not self._make_room(key, entries, relayer):
            return False
        if not super().store_subkey(key, subkey, value, expiration_time):
            return False
        self.count += 1
        if relayer is not None:
            self._relays.setdefault(key, {})[subkey] = relayer
            self._per_peer[relayer] = self._per_peer.get(relayer, 0) + 1
        return True

    def _entries(self, key: DHTID) -> Optional[DictionaryDHTValue]:
        found = self.get(key)
        return found.value if found is not None and isinstance(found.value, DictionaryDHTValue) else None

    def _make_room(self, key: DHTID, entries: Optional[DictionaryDHTValue], relayer: Optional["PeerID"]) -> bool:
        """Whether a new record under ``key`` fits (relayed by ``relayer``, or first-hand if None); a first-hand
        record may evict a relayed one."""
        limits = self.limits
        if relayer is not None:
            if self._per_peer.get(relayer, 0) >= limits.max_relayed_per_peer:
                self._recount()
            relays = self._relays.get(key, {})
            under_key = sum(1 for s, p in relays.items() if p == relayer and entries is not None and s in entries.data)
            if under_key >= limits.max_relayed_per_key or self._per_peer.get(relayer, 0) >= limits.max_relayed_per_peer:
                self._warnings.warn(relayer, f"refusing records relayed by peer {relayer}: it has the most it may")
                return False
        if entries is not None and len(entries) >= limits.max_subkeys_per_key:
            return relayer is None and self._evict(key)
        if self.count >= limits.max_records:
            self._recount()
            if self.count >= limits.max_records:
                return relayer is None and self._evict(None)
        return True

    def _evict(self, key: Optional[DHTID]) -> bool:
        """Drop one relayed record under ``key`` (any key if None) to make room for a first-hand one; False if
        there is none."""
        for candidate in [key] if key is not None else list(self._relays):
            relays, entries = self._relays.get(candidate, {}), self._entries(candidate)
            while relays:
                subkey, relayer = relays.popitem()
                self._per_peer[relayer] -= 1
                if entries is not None and subkey in entries.data:
                    del entries[subkey]
                    self.count -= 1
                    return True
        self._warnings.warn("full", "refusing a first-hand DHT record: its key or the node is full of them")
        return False

    def _recount(self) -> None:
        """Count the live records again and forget expired relays (at most once a second)."""
        if time.monotonic() - self._recounted < 1.0:
            return
        self._recounted = time.monotonic()
        live = {key: item.value for key, item in self.items() if isinstance(item.value, DictionaryDHTValue)}
        self.count = sum(len(entries) for entries in live.values())
        self._relays = {
            key: {s: p for s, p in relays.items() if key in live and s in live[key].data}
            for key, relays in self._relays.items()
        }
        self._per_peer = {}
        for relays in self._relays.values():
            for peer in relays.values():
                self._per_peer[peer] = self._per_peer.get(peer, 0) + 1


class NoCache(DHTLocalStorage):
    """A DHT cache that keeps nothing (see the module's docstring)."""

    def store(self, key: DHTID, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        return False

    def store_subkey(self, key: DHTID, subkey: Any, value: bytes, expiration_time: float) -> bool:
        return False


async def join_dht(limits: RecordLimits, validator: RecordValidatorBase, **options: Any) -> "DHTNode":
    """``DHTNode.create(**options)`` with ``validator`` and the bounds of ``limits`` on what it stores and reads."""
    from hivemind.dht import DHTNode

    options.setdefault("cache_nearest", 0)
    options.setdefault("cache_locally", False)
    checks = CompositeValidator([validator, RecordSizeValidator(limits)])
    node = await DHTNode.create(record_validator=checks, **options)
    try:
        bound_node(node, limits)
        if not node.protocol.client_mode:
            await _tell_storing_peer(node.protocol)
    except BaseException:
        await node.shutdown()
        raise
    return node


async def _tell_storing_peer(protocol: Any) -> None:
    """Serve ``rpc_store`` again, with the calling peer in ``_STORING_PEER`` while the storage stores.

    hivemind binds its handlers when the node starts (through a wrapper that only adds an authorizer, which the
    swarm does not use), so the handler is registered anew rather than patched."""
    from hivemind.proto import dht_pb2

    name = protocol._get_handle_name(None, "rpc_store")
    rpc_store = protocol.rpc_store

    async def rpc_store_with_sender(request: Any, context: Any) -> Any:
        token = _STORING_PEER.set(context.remote_id)
        try:
            return await rpc_store(request, context)
        finally:
            _STORING_PEER.reset(token)

    await protocol.p2p.remove_protobuf_handler(name)
    await protocol.p2p.add_protobuf_handler(name, rpc_store_with_sender, dht_pb2.StoreRequest)


def bound_node(node: "DHTNode", limits: RecordLimits) -> None:
    """Give ``node`` bounded storage, no cache and a bound on the values it reads."""
    protocol = node.protocol
    storage = BoundedRecordStorage(limits)
    for key, item in protocol.storage.items():  # what came before the bounds (the node just joined)
        if isinstance(item.value, DictionaryDHTValue):
            for subkey, entry in item.value.items():
                storage.store_subkey(key, subkey, entry.value, entry.expiration_time)
    protocol.storage, protocol.cache = storage, NoCache()
    validate_dictionary = protocol._validate_dictionary

    def bounded_validate_dictionary(key: bytes, dictionary: DictionaryDHTValue) -> bool:
        if len(dictionary.data) > limits.max_subkeys_per_key:
            storage._warnings.warn("read", f"refusing a DHT value of more than {limits.max_subkeys_per_key} records")
            return False
        return validate_dictionary(key, dictionary)

    protocol._validate_dictionary = bounded_validate_dictionary  # looked up on the protocol at each use


def _relayer(subkey: Any) -> Optional["PeerID"]:
    """The peer storing ``subkey``'s record if it is not the record's owner; None for first-hand records
    (and for this node's own stores)."""
    sender = _STORING_PEER.get()
    if sender is None:
        return None
    try:
        return None if owner_peer_id(subkey) == sender else sender
    except ValueError:
        return sender


class _Warnings:
    """WARNING logs of refusals, at most one per kind every REPORT_PERIOD seconds, with how many were refused."""

    def __init__(self) -> None:
        self._last: dict[Any, float] = {}
        self._counts: dict[Any, int] = {}

    def warn(self, kind: Any, message: str) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last.get(kind, -float("inf")) < REPORT_PERIOD:
            return
        if len(self._last) > 1024:
            self._last.clear()
            self._counts = {kind: self._counts[kind]}
        self._last[kind] = now
        logger.warning(f"{message} ({self._counts.pop(kind)} refused since the last such warning)")
