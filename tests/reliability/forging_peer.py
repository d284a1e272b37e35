"""A hostile full DHT node of a swarm: stores whatever it likes, signed with whatever key it holds.

It runs on a :class:`SwarmConnection`'s event loop, as a full (not client-mode) node whose p2p identity is
its own :class:`PeerKey`, so records it signs with that key speak for a live peer that serves no block.
Its validator signs every record with the key it is given and accepts everything, so it keeps its own
forgeries and hands them out when asked: honest nodes must refuse them when it stores and when it answers.
It can also flood (:meth:`ForgingPeer.flood`): thousands of records, each signed by a fresh key of its own
(:func:`cheap_keys`), so that every signature verifies, stored straight at an honest node.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import sympy
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.signed_records import PeerKey, SwarmRecordValidator


class ForgingValidator(SwarmRecordValidator):
    """Signs every record with its key, whatever the subkey says; validates nothing."""

    def sign_value(self, record: DHTRecord) -> bytes:
        signature = self._private_key.sign(self._serialize_record(record))
        return record.value + self.SIGNATURE_FORMAT.replace(b"_value_", signature)

    def validate(self, record: DHTRecord) -> bool:
        return True


class ForgingPeer:
    def __init__(self, initial_peers: Sequence[str]):
        self.key = PeerKey()
        self._loop_owner = SwarmConnection(initial_peers)
        with tempfile.TemporaryDirectory() as folder:
            identity = Path(folder) / "identity"
            self.key.write_identity(identity)
            self.node: DHTNode = self.run(
                DHTNode.create(
                    initial_peers=list(initial_peers),
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    identity_path=str(identity),
                    check_if_identity_free=False,
                    record_validator=ForgingValidator(self.key),
                )
            )
        assert self.node.peer_id == self.key.peer_id

    def run(self, coroutine: Any) -> Any:
        return self._loop_owner.run(coroutine, timeout=60)

    def store(self, key: str, value: Any, subkey: Any = None, signer: Optional[PeerKey] = None, ttl=600.0) -> bool:
        """Store ``value`` under ``key`` (and ``subkey``), signed by ``signer`` (default: the peer's own key)."""
        self.node.protocol.record_validator = ForgingValidator(signer or self.key)
        return self.run(self.node.store(key, value, get_dht_time() + ttl, subkey=subkey))

    def flood(self, peer: PeerID, records: Sequence[tuple[str, PeerKey, Any]], ttl: float = 600.0) -> int:
        """Store every ``(key, signer, value)`` at ``peer`` under the signer's subkey, signed by it, in chunks of
        500, and keep them in this node's own storage (so it hands them all out when asked); returns how many
        ``peer`` accepted."""
        expiration = get_dht_time() + ttl
        signed = [_signed(key, signer, value, expiration) for key, signer, value in records]
        for key_id, subkey, value in signed:
            self.node.protocol.storage.store_subkey(key_id, subkey, value, expiration)
        accepted, self.node.protocol.wait_timeout = 0, 120.0  # a node checks 500 signatures per store: not 3 s
        for start in range(0, len(signed), 500):
            chunk = signed[start : start + 500]
            keys, subkeys, values = (list(column) for column in zip(*chunk))
            answer = self.run(self.node.protocol.call_store(peer, keys, values, expiration, subkeys=subkeys))
            assert answer is not None, f"peer {peer} did not answer a store"
            accepted += sum(answer)
        return accepted

    def subkeys(self, key: str) -> list[Any]:
        """The subkeys under ``key`` as the honest nodes hold them (asked through the connection's client)."""
        found = self._loop_owner.run(self._loop_owner.node.get(key, latest=True), timeout=60)
        return [] if found is None or not isinstance(found.value, dict) else list(found.value)

    def close(self) -> None:
        try:
            self.run(self.node.shutdown())
        finally:
            self._loop_owner.close()


def _signed(key: str, signer: PeerKey, value: Any, expiration: float) -> tuple[DHTID, str, bytes]:
    key_id = DHTID.generate(source=key)
    record = DHTRecord(
        key_id.to_bytes(), MSGPackSerializer.dumps(signer.subkey), MSGPackSerializer.dumps(value), expiration
    )
    return key_id, signer.subkey, ForgingValidator(signer).sign_value(record)


def cheap_keys(count: int, bits: int = 512) -> list[PeerKey]:
    """``count`` distinct RSA keys of ``bits`` bits, made fast: every pair of a small pool of primes is a key. A
    flood needs many keys, not strong ones (honest nodes take an owner key of any size)."""
    pool_size = math.ceil((1 + math.sqrt(1 + 8 * count)) / 2) + 4  # pairs enough, and a few to spare
    primes: set[int] = set()
    while len(primes) < pool_size:
        primes.add(sympy.randprime(2 ** (bits // 2 - 1), 2 ** (bits // 2)))
    keys = []
    for p, q in itertools.combinations(sorted(primes), 2):
        phi, e = (p - 1) * (q - 1), 65537
        if math.gcd(e, phi) != 1:
            continue
        d = pow(e, -1, phi)
        numbers = rsa.RSAPrivateNumbers(
            p,
            q,
            d,
            rsa.rsa_crt_dmp1(d, p),
            rsa.rsa_crt_dmq1(d, q),
            rsa.rsa_crt_iqmp(p, q),
            rsa.RSAPublicNumbers(e, p * q),
        )
        key = PeerKey.__new__(PeerKey)
        key._private_key = numbers.private_key(unsafe_skip_rsa_key_validation=True)  # the primes are primes
        keys.append(key)
        if len(keys) == count:
            return keys
    raise AssertionError(f"{pool_size} primes gave fewer than {count} keys")
