"""What a node's bounded DHT storage keeps: first-hand records always, relayed ones up to their limits."""

from __future__ import annotations

from typing import Optional

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from ptune_search.swarm import record_bounds
from ptune_search.swarm.record_bounds import BoundedRecordStorage, RecordLimits, RecordSizeValidator
from ptune_search.swarm.signed_records import PeerKey
from tests.reliability.forging_peer import cheap_keys

LIMITS = RecordLimits(max_subkeys_per_key=6, max_relayed_per_key=3, max_relayed_per_peer=5, max_records=10)
KEYS = cheap_keys(40)
FLOODER, OTHER = PeerKey().peer_id, PeerKey().peer_id


def store(storage: BoundedRecordStorage, key: str, owner: PeerKey, sender: Optional[PeerID]) -> bool:
    """Store ``owner``'s record under ``key`` as sent by ``sender`` (None: the node itself); its owner is the
    sender when ``sender`` is ``owner.peer_id`` (first-hand)."""
    token = record_bounds._STORING_PEER.set(sender)
    try:
        return storage.store_subkey(DHTID.generate(source=key), owner.subkey, b"record", get_dht_time() + 60)
    finally:
        record_bounds._STORING_PEER.reset(token)


def stored(storage: BoundedRecordStorage, key: str) -> set[str]:
    found = storage.get(DHTID.generate(source=key))
    return set() if found is None else {subkey for subkey, _ in found.value.items()}


def test_one_peer_relays_at_most_max_relayed_per_key_under_a_key_and_max_relayed_per_peer_in_all():
    storage = BoundedRecordStorage(LIMITS)
    assert [store(storage, "m.0", key, FLOODER) for key in KEYS[:5]] == [True] * 3 + [False] * 2
    assert [store(storage, "m.1", key, FLOODER) for key in KEYS[5:10]] == [True] * 2 + [False] * 3  # 5 in all
    assert store(storage, "m.0", KEYS[10], OTHER), "another peer's relay is refused for the flooder's"
    assert store(storage, "m.0", KEYS[0], FLOODER), "a refresh of a stored record is refused"


def test_first_hand_records_take_the_place_of_relayed_ones_in_a_full_key_and_a_full_node():
    storage = BoundedRecordStorage(LIMITS)
    relayed = [store(storage, "m.0", key, sender) for key, sender in zip(KEYS[:6], [FLOODER] * 3 + [OTHER] * 3)]
    assert relayed == [True] * 6 and len(stored(storage, "m.0")) == LIMITS.max_subkeys_per_key
    servers = KEYS[20:26]
    assert all(store(storage, "m.0", key, key.peer_id) for key in servers), "a server's own record found no room"
    assert stored(storage, "m.0") == {key.subkey for key in servers}
    assert not store(storage, "m.0", KEYS[26], KEYS[26].peer_id), "a key full of first-hand records grew"
    assert all(store(storage, "m.1", key, OTHER if i < 2 else key.peer_id) for i, key in enumerate(KEYS[30:34]))
    assert storage.count == LIMITS.max_records
    assert not store(storage, "m.2", KEYS[34], FLOODER), "a full node took a relayed record"
    assert store(storage, "m.2", KEYS[35], KEYS[35].peer_id) and storage.count == LIMITS.max_records
    assert len(stored(storage, "m.1")) == 3, "the first-hand record did not evict a relayed one"


def test_records_too_large_or_expiring_too_late_are_refused():
    validator = RecordSizeValidator(LIMITS)
    now = get_dht_time()
    assert validator.validate(DHTRecord(b"k", b"s", b"x" * LIMITS.max_record_bytes, now + 60))
    assert not validator.validate(DHTRecord(b"k", b"s", b"x" * (LIMITS.max_record_bytes + 1), now + 60))
    assert not validator.validate(DHTRecord(b"k", b"s", b"x", now + LIMITS.max_ttl + 60))
